"""Model family adapters: names, config keys and a consistency check, on top of the analysis.

An adapter never changes what the analysis derived. It says which config key each group kind
maps to, what the layers are called, and checks that the derived structure matches what the
family's config documents (a mismatch means the analysis or the adapter is wrong: fail loudly).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .groups import Structure


class FamilyMismatch(UserError):
    """The derived structure disagrees with the family's config."""


@dataclass
class FamilyAdapter:
    name: str
    model_types: tuple[str, ...]
    config_keys: dict[str, str]
    # group kind -> [(group attribute, or "fixed.<part>"; the config key it must equal)]
    expected: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def layer_kinds(self, config: Any) -> list[str] | None:
        return None

    def pruned_config(self, config: Any, values: dict[str, int], kept_layers: list[int]) -> Any:
        """The family config of the pruned model: new sizes, and only the kept layers."""
        new = copy.deepcopy(config)
        for key, value in values.items():
            setattr(new, key, value)
        self.keep_layers(new, config, kept_layers)
        self.derive(new)
        try:  # the family's own validation, as from_pretrained will run it on the written config
            type(new).from_dict(new.to_dict())
        except Exception as err:  # transformers raises ValueError or a wrapped validation error
            cause = err.__cause__ or err
            raise FamilyMismatch(f"{self.name}: the pruned configuration is not valid for {type(new).__name__}: "
                                 f"{str(cause).strip().splitlines()[-1]}") from None
        return new

    def keep_layers(self, new: Any, old: Any, kept_layers: list[int]) -> None:
        new.num_hidden_layers = len(kept_layers)

    def derive(self, new: Any) -> None:
        """Config keys that follow from the pruned sizes."""

    def export_extras(self, config: Any) -> dict[str, Any]:
        """Keys other runtimes read that transformers does not write (see FORMATS.md)."""
        return {}

    def check(self, structure: Structure, config: Any) -> None:
        for group in structure.groups:
            for attribute, key in self.expected.get(group.kind, []):
                want = _config_value(config, key)
                have = group.fixed.get(attribute[6:]) if attribute.startswith("fixed.") else getattr(group, attribute)
                if want is not None and have != want:
                    raise FamilyMismatch(
                        f"{self.name}: group {group.name} has {attribute}={have} but config {key}={want}"
                    )
        n_layers = _config_value(config, "num_hidden_layers")
        if n_layers is not None and structure.layers and len(structure.layers) != n_layers:
            raise FamilyMismatch(f"{self.name}: found {len(structure.layers)} layers, config says {n_layers}")


def _config_value(config: Any, key: str) -> Any:
    return getattr(config, key, None)


class NemotronHAdapter(FamilyAdapter):
    KIND_OF_BLOCK = {"mamba": "mamba", "linear_attention": "mamba", "M": "mamba", "attention": "attention",
                     "full_attention": "attention", "*": "attention", "mlp": "mlp", "-": "mlp", "moe": "moe", "E": "moe"}

    def layer_kinds(self, config: Any) -> list[str]:
        return [self.KIND_OF_BLOCK[block] for block in config.layers_block_type]

    def keep_layers(self, new: Any, old: Any, kept_layers: list[int]) -> None:
        new.layers_block_type = [old.layers_block_type[i] for i in kept_layers]

    def export_extras(self, config: Any) -> dict[str, Any]:
        # TensorRT-LLM and vLLM read the legacy pattern, both head_dim names and both epsilon names
        return {"hybrid_override_pattern": config.hybrid_override_pattern,
                "num_hidden_layers": len(config.layers_block_type),
                "attention_head_dim": config.head_dim, "rms_norm_eps": config.layer_norm_epsilon}


class Mamba2Adapter(FamilyAdapter):
    def layer_kinds(self, config: Any) -> list[str]:
        return ["mamba"] * config.num_hidden_layers

    def derive(self, new: Any) -> None:
        inner = new.num_heads * new.head_dim
        if inner % new.hidden_size:  # Mamba2 derives its SSM width as int(expand * hidden_size)
            raise FamilyMismatch(
                f"mamba2: num_heads*head_dim ({inner}) must be a multiple of hidden_size ({new.hidden_size}), "
                "because Mamba2ForCausalLM computes its SSM width as expand * hidden_size; choose a hidden_size "
                f"that divides {inner}")
        new.expand = inner // new.hidden_size


class LlamaAdapter(FamilyAdapter):
    def layer_kinds(self, config: Any) -> list[str]:
        return ["attention+mlp"] * config.num_hidden_layers

    def keep_layers(self, new: Any, old: Any, kept_layers: list[int]) -> None:
        new.num_hidden_layers = len(kept_layers)
        if getattr(old, "layer_types", None):
            new.layer_types = [old.layer_types[i] for i in kept_layers]


ADAPTERS: list[FamilyAdapter] = [
    NemotronHAdapter(
        name="nemotron_h",
        model_types=("nemotron_h",),
        config_keys={"hidden": "hidden_size", "ffn": "intermediate_size", "mamba_heads": "mamba_num_heads",
                     "mamba_head_dim": "mamba_head_dim", "attention_heads": "num_attention_heads",
                     "attention_head_dim": "head_dim", "layer": "num_hidden_layers"},
        expected={"hidden": [("size", "hidden_size")], "ffn": [("size", "intermediate_size")],
                  "mamba_heads": [("size", "mamba_num_heads"), ("balanced_groups", "n_groups"),
                                  ("unit", "mamba_head_dim"), ("fixed.ssm_state", "ssm_state_size")],
                  "mamba_head_dim": [("size", "mamba_head_dim")],
                  "attention_heads": [("size", "num_attention_heads"), ("balanced_groups", "num_key_value_heads"),
                                      ("unit", "head_dim")],
                  "attention_head_dim": [("size", "head_dim")]},
    ),
    Mamba2Adapter(
        name="mamba2",
        model_types=("mamba2",),
        config_keys={"hidden": "hidden_size", "mamba_heads": "num_heads", "mamba_head_dim": "head_dim",
                     "layer": "num_hidden_layers"},
        expected={"hidden": [("size", "hidden_size")],
                  "mamba_heads": [("size", "num_heads"), ("unit", "head_dim"), ("fixed.ssm_state", "state_size")],
                  "mamba_head_dim": [("size", "head_dim")]},
    ),
    LlamaAdapter(
        name="llama",
        model_types=("llama", "qwen2", "mistral"),
        config_keys={"hidden": "hidden_size", "ffn": "intermediate_size", "attention_heads": "num_attention_heads",
                     "attention_head_dim": "head_dim", "layer": "num_hidden_layers"},
        expected={"hidden": [("size", "hidden_size")], "ffn": [("size", "intermediate_size")],
                  "attention_heads": [("size", "num_attention_heads"), ("balanced_groups", "num_key_value_heads")]},
    ),
]


def adapter_for(model: Any) -> FamilyAdapter | None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return next((a for a in ADAPTERS if model_type in a.model_types), None)


def apply_adapter(structure: Structure, model: Any) -> FamilyAdapter | None:
    """Check the structure against the family's config and fill in config keys."""
    adapter = adapter_for(model)
    if adapter is None:
        return None
    adapter.check(structure, model.config)
    for group in structure.groups:
        group.config_key = adapter.config_keys.get(group.kind)
    return adapter
