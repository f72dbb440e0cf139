"""NVIDIA Nemotron-H (`NemotronHForCausalLM`): Mamba2, attention and MLP layers in a block pattern."""

from __future__ import annotations

from typing import Any

from .base import Family
from .runtime import StatefulLayout, Sublayer

# layers_block_type names (and the legacy hybrid_override_pattern characters) -> LAYER_KINDS
KIND_OF_BLOCK = {"mamba": "mamba", "linear_attention": "mamba", "M": "mamba", "attention": "attention",
                 "full_attention": "attention", "*": "attention", "mlp": "mlp", "-": "mlp", "moe": "moe", "E": "moe"}
PATTERN_CHARACTERS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


class NemotronH(Family):
    def trace_seq_len(self, config: Any) -> int:
        return int(config.chunk_size)

    def layer_kinds(self, config: Any) -> list[str]:
        return [KIND_OF_BLOCK[block] for block in config.layers_block_type]

    def keep_layers(self, new: Any, old: Any, kept_layers: list[int]) -> None:
        new.layers_block_type = [old.layers_block_type[i] for i in kept_layers]

    def export_extras(self, config: Any) -> dict[str, Any]:
        # TensorRT-LLM and vLLM read the legacy pattern, both head_dim names and both epsilon names
        return {"hybrid_override_pattern": config.hybrid_override_pattern,
                "num_hidden_layers": len(config.layers_block_type),
                "attention_head_dim": config.head_dim, "rms_norm_eps": config.layer_norm_epsilon}

    def hub_weight_shapes(self, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Every weight of the hub layout (``backbone.*``) that a runtime's loader reads (TensorRT-LLM's
        mapper: export/trtllm.py), with its shape, from a config.json's keys."""
        hidden, vocab = config["hidden_size"], config["vocab_size"]
        inner = config.get("mamba_num_heads", 0) * config.get("mamba_head_dim", 0)
        heads, state, groups = config.get("mamba_num_heads", 0), config.get("ssm_state_size", 0), config.get("n_groups", 1)
        conv_dim = inner + 2 * groups * state
        head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
        q, kv = config.get("num_attention_heads", 0) * head_dim, config.get("num_key_value_heads", 0) * head_dim
        shapes: dict[str, tuple[int, ...]] = {"backbone.embeddings.weight": (vocab, hidden), "backbone.norm_f.weight": (hidden,)}
        if not config.get("tie_word_embeddings"):
            shapes["lm_head.weight"] = (vocab, hidden)
        for i, kind in enumerate(config["hybrid_override_pattern"]):
            prefix = f"backbone.layers.{i}"
            shapes[f"{prefix}.norm.weight"] = (hidden,)
            mixer = f"{prefix}.mixer"
            if kind == "M":
                shapes |= {f"{mixer}.in_proj.weight": (inner + conv_dim + heads, hidden),
                           f"{mixer}.conv1d.weight": (conv_dim, 1, config["conv_kernel"]),
                           f"{mixer}.A_log": (heads,), f"{mixer}.D": (heads,), f"{mixer}.dt_bias": (heads,),
                           f"{mixer}.norm.weight": (inner,), f"{mixer}.out_proj.weight": (hidden, inner)}
                if config.get("use_conv_bias", True):
                    shapes[f"{mixer}.conv1d.bias"] = (conv_dim,)
            elif kind == "*":
                shapes |= {f"{mixer}.q_proj.weight": (q, hidden), f"{mixer}.k_proj.weight": (kv, hidden),
                           f"{mixer}.v_proj.weight": (kv, hidden), f"{mixer}.o_proj.weight": (hidden, q)}
            elif kind == "-":
                shapes |= {f"{mixer}.up_proj.weight": (config["intermediate_size"], hidden),
                           f"{mixer}.down_proj.weight": (hidden, config["intermediate_size"])}
        return shapes

    def transformers_cache_fails(self, config: Any) -> bool:
        # its cache asks the attention layers for the sequence length: a model without any cannot decode
        return "attention" not in self.layer_kinds(config)

    def stateful_layout(self, model: Any) -> StatefulLayout:
        backbone = model.model
        kinds = self.layer_kinds(model.config)
        return StatefulLayout(embeddings=backbone.embeddings, final_norm=backbone.norm_f, lm_head=model.lm_head,
                              layers=[[Sublayer(kind, block.norm, block.mixer)]
                                      for kind, block in zip(kinds, backbone.layers)])


NEMOTRON_H = NemotronH(
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
)
