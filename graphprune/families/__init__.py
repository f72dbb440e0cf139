"""Model families: everything model-specific, one module per family.

A family says which config keys express each group kind's size, what its layers are, how long a
trace should be, how to write the pruned config and what other runtimes need on top. Nothing outside
this package names a `model_type` or a config key. Written families (`nemotron_h`, `mamba2`, `llama`)
are fast and add runtime extras; any other Hugging Face model gets a `DerivedFamily`, whose config
keys are found by building its class on the meta device (derived.py). A family may derive its keys
and write only its runtime (granitemoehybrid.py, bamba.py). Adding a family is one module here plus its entry
in `WRITTEN`.
"""

from __future__ import annotations

from torch import nn

from .bamba import BAMBA
from .base import LAYER_KINDS, Family, FamilyMismatch
from .derived import DerivedFamily
from .granitemoehybrid import GRANITE_MOE_HYBRID
from .llama import LLAMA
from .mamba2 import MAMBA2
from .nemotron_h import NEMOTRON_H

WRITTEN: list[Family] = [NEMOTRON_H, MAMBA2, LLAMA, GRANITE_MOE_HYBRID, BAMBA]

__all__ = ["LAYER_KINDS", "WRITTEN", "DerivedFamily", "Family", "FamilyMismatch", "family_for", "written_family",
           "trace_seq_len"]


def written_family(model: nn.Module) -> Family | None:
    """The hand-written family of `model` (by its config's model_type), if there is one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((f for f in WRITTEN if model_type in f.model_types), None)


def is_hugging_face(model: nn.Module) -> bool:
    """A transformers model: its class can be rebuilt from its config (what a derived family needs)."""
    return hasattr(model, "config") and hasattr(model, "generation_config") and hasattr(type(model), "config_class")


def family_for(model: nn.Module) -> Family | None:
    """The family before analysis: the written one, else (Hugging Face models) an underived DerivedFamily,
    else None (plain modules: the generic graph path)."""
    written = written_family(model)
    if written is not None:
        return written
    return DerivedFamily() if is_hugging_face(model) else None


def trace_seq_len(model: nn.Module) -> int:
    """The sequence length to trace `model` with (a whole Mamba chunk where there is one)."""
    family = family_for(model)
    return family.trace_seq_len(model.config) if family is not None else 16
