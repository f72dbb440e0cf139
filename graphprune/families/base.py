"""The `Family` interface: what graphprune needs to know about a model family beyond its graph.

A family never changes what the analysis derived. It says which config key each group kind maps to,
what the layers are, checks that the derived structure matches what the config documents (a
mismatch means the analysis or the family is wrong: fail loudly), and writes the pruned config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..groups import Structure

# The layer vocabulary every family maps its own names to (Nemotron-H's "M"/"linear_attention", ...).
LAYER_KINDS = ("mamba", "attention", "mlp", "moe", "attention+mlp")


class FamilyMismatch(UserError):
    """The derived structure disagrees with the family's config, or a pruned config cannot be written."""


@dataclass
class Family:
    name: str
    model_types: tuple[str, ...] = ()
    config_keys: dict[str, str] = field(default_factory=dict)
    # group kind -> [(group attribute, or "fixed.<part>"; the config key it must equal)]
    expected: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    # ------------------------------------------------------------------ before and at analysis

    def trace_seq_len(self, config: Any) -> int:
        """The trace length: a whole Mamba chunk where there is one, so the chunked scan is traced whole."""
        return 16

    def layer_kinds(self, config: Any) -> list[str] | None:
        """Each layer's kind (from LAYER_KINDS), or None to let the analysis name them."""
        return None

    def bind(self, structure: Structure, model: Any) -> Family:
        """The family of this analysed model: the structure checked, each group's config key filled in."""
        self.check(structure, model.config)
        for group in structure.groups:
            group.config_key = self.config_keys.get(group.kind)
        return self

    def summary_keys(self, structure: Structure) -> list[str]:
        """The config keys a report shows: each group kind's, the KV heads and the layer count."""
        return sorted({g.config_key for g in structure.groups if g.config_key} |
                      {"num_key_value_heads", self.layer_count_key()})

    def describe(self) -> dict[str, Any]:
        """What `inspect --json` shows: each group kind's config keys."""
        return {kind: {"keys": [key]} for kind, key in self.config_keys.items()}

    def layer_count_key(self) -> str:
        """The config key holding the number of layers."""
        return self.config_keys.get("layer", "num_hidden_layers")

    def check(self, structure: Structure, config: Any) -> None:
        for group in structure.groups:
            for attribute, key in self.expected.get(group.kind, []):
                want = getattr(config, key, None)
                have = group.fixed.get(attribute[6:]) if attribute.startswith("fixed.") else getattr(group, attribute)
                if want is not None and have != want:
                    raise FamilyMismatch(
                        f"{self.name}: group {group.name} has {attribute}={have} but config {key}={want}"
                    )
        n_layers = getattr(config, "num_hidden_layers", None)
        if n_layers is not None and structure.layers and len(structure.layers) != n_layers:
            raise FamilyMismatch(f"{self.name}: found {len(structure.layers)} layers, config says {n_layers}")

    # ------------------------------------------------------------------ the pruned model

    def pruned_config(self, config: Any, kind_sizes: dict[str, int], kept_layers: list[int]) -> Any:
        """The config of the pruned model: the new size of each shrunk group kind, only the kept layers."""
        new = copy.deepcopy(config)
        for kind, value in kind_sizes.items():
            if kind not in self.config_keys:
                raise FamilyMismatch(f"{self.name}: its config has no key for the size of the {kind} groups, "
                                     f"so they cannot be pruned (keys: {', '.join(self.config_keys.values())})")
            setattr(new, self.config_keys[kind], value)
        self.keep_layers(new, config, kept_layers)
        self.derive(new, config)
        validate(self.name, new)
        return new

    def keep_layers(self, new: Any, old: Any, kept_layers: list[int]) -> None:
        new.num_hidden_layers = len(kept_layers)

    def derive(self, new: Any, old: Any) -> None:
        """Config keys that follow from the pruned sizes (or must keep the original's value)."""

    # ------------------------------------------------------------------ runtimes

    def export_extras(self, config: Any) -> dict[str, Any]:
        """Keys other runtimes read that transformers does not write (see FORMATS.md)."""
        return {}

    def inference_state_bytes(self, analysis: Any, sizes: dict[str, int], dropped: list[int], seq_len: int,
                              dtype_bytes: int) -> int:
        """Bytes of generation state one sequence of `seq_len` tokens holds in the pruned model: per Mamba
        layer the float32 SSM state (heads x head_dim x state) and the conv window (conv channels x kernel),
        per attention layer K and V (kv_heads x head_dim x seq_len each). Read from the analysis, so any
        family gets it; a family whose runtime keeps other state overrides it."""
        from ..planning import pruned_shape

        tensors = dict(analysis.model.named_parameters())
        convs = [source.conv_weight for source in analysis.conv_sources]
        total = 0
        for layer in analysis.layers:
            if layer.index in set(dropped):
                continue
            groups = {g.kind: g for g in analysis.groups if g.layer == layer.index}
            if "mamba_heads" in groups:
                heads = groups["mamba_heads"]
                head_dim = sizes[groups["mamba_head_dim"].name] if "mamba_head_dim" in groups else heads.unit
                total += 4 * sizes[heads.name] * head_dim * heads.fixed.get("ssm_state", 0)
                for conv in (c for c in convs if c.startswith(f"{layer.module}.")):
                    channels, *_, kernel = pruned_shape(analysis, conv, tuple(tensors[conv].shape), sizes)
                    total += dtype_bytes * channels * kernel
            if "attention_heads" in groups:
                heads = groups["attention_heads"]
                total += 2 * heads.balanced_groups * heads.unit * seq_len * dtype_bytes
        return total

    def transformers_cache_fails(self, config: Any) -> bool:
        """Whether transformers' own generation cache cannot serve this model (the bench then decodes
        through the explicit-state runner)."""
        return False

    def stateful_layout(self, model: Any) -> Any:
        """The `runtime.StatefulLayout` of `model` for the explicit-state runner and its ONNX export
        (export/stateful.py), or None where this family has no runtime hook."""
        return None


def validate(name: str, config: Any) -> None:
    """The config class' own validation, as from_pretrained will run it on the written config."""
    try:
        type(config).from_dict(config.to_dict())
    except Exception as err:  # transformers raises ValueError or a wrapped validation error
        cause = err.__cause__ or err
        raise FamilyMismatch(f"{name}: the pruned configuration is not valid for {type(config).__name__}: "
                             f"{str(cause).strip().splitlines()[-1]}") from None
