"""What the explicit-state runner (export/stateful.py) needs to know about a model, per family.

The runner is generic: it embeds, runs residual sublayers (Mamba2 mixer, attention or MLP, each after
its pre-norm), then the final norm and the LM head, carrying each Mamba layer's conv and SSM state
and each attention layer's keys and values as plain tensors. A family hands it a `StatefulLayout`:
the model's own modules in call order, each sublayer's kind, and the few scalars a family applies
between them (Granite's multipliers, Mamba2's float32 residual, RoPE where there is one) and each
attention branch's sliding window, if it has one.

Families answer through `Family.stateful_layout` (a family whose config keys are derived can still
write its runtime: granitemoehybrid.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

# The sublayer kinds the runner knows how to carry state through; every other kind (e.g. "moe") is refused by name.
STATEFUL_KINDS = ("mamba", "attention", "mlp")


@dataclass
class Sublayer:
    """One residual branch: ``hidden + residual_multiplier * mixer(norm(hidden))``."""

    kind: str  # "mamba", "attention", "mlp" (or a kind the runner refuses, such as "moe")
    norm: nn.Module
    mixer: nn.Module
    # attention only: sliding-window attention, the query at position i sees the keys at positions
    # i - window < j <= i (transformers' `sliding_window`); None: every earlier position
    window: int | None = None


@dataclass
class StatefulLayout:
    """A model's modules in the order the runner calls them."""

    embeddings: nn.Module
    layers: list[list[Sublayer]]  # per decoder layer, its residual branches in order
    final_norm: nn.Module
    lm_head: nn.Module
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logits_divisor: float = 1.0
    residual_in_fp32: bool = False  # the residual stream kept in float32 (Mamba2's residual_in_fp32)
    # RoPE: (hidden, position_ids [1, L]) -> (cos, sin), and (q, k, cos, sin) -> (q, k); None without RoPE
    rotary: Callable[..., Any] | None = None
    apply_rotary: Callable[..., Any] | None = None


class NoRuntime(ValueError):
    """The model has no stateful layout: neither its family nor a runtime hook describes it."""


def stateful_layout(model: nn.Module) -> StatefulLayout:
    """The layout of `model`, from its family. Raises `NoRuntime` (a ValueError) naming the model type,
    and the layer kinds its family knows, when the family has none."""
    from . import family_for

    family = family_for(model)
    layout = family.stateful_layout(model) if family is not None else None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if layout is None:
        kinds = family.layer_kinds(model.config) if family is not None else None
        known = f" (layer kinds: {', '.join(dict.fromkeys(kinds))})" if kinds else ""
        raise NoRuntime(f"stateful export has no runtime for model_type {model_type or type(model).__name__!r}"
                        f"{known}; supported: {', '.join(supported_model_types())} (layers of kinds "
                        f"{', '.join(STATEFUL_KINDS)})")
    return layout


def supported_model_types() -> list[str]:
    """Model types with a stateful layout: the written families that override the hook."""
    from . import WRITTEN
    from .base import Family

    written = [f for f in WRITTEN if type(f).stateful_layout is not Family.stateful_layout]
    return [t for family in written for t in family.model_types]
