"""Mamba2 (`Mamba2ForCausalLM`): Mamba2 layers only; its SSM width is `expand * hidden_size`."""

from __future__ import annotations

from typing import Any

from .base import Family, FamilyMismatch
from .runtime import StatefulLayout, Sublayer


class Mamba2(Family):
    def trace_seq_len(self, config: Any) -> int:
        return int(config.chunk_size)

    def layer_kinds(self, config: Any) -> list[str]:
        return ["mamba"] * config.num_hidden_layers

    def derive(self, new: Any, old: Any) -> None:
        inner = new.num_heads * new.head_dim
        if inner % new.hidden_size:  # Mamba2 derives its SSM width as int(expand * hidden_size)
            raise FamilyMismatch(
                f"mamba2: num_heads*head_dim ({inner}) must be a multiple of hidden_size ({new.hidden_size}), "
                "because Mamba2ForCausalLM computes its SSM width as expand * hidden_size; choose a hidden_size "
                f"that divides {inner}")
        new.expand = inner // new.hidden_size

    def stateful_layout(self, model: Any) -> StatefulLayout:
        backbone = model.backbone
        return StatefulLayout(embeddings=backbone.embeddings, final_norm=backbone.norm_f, lm_head=model.lm_head,
                              layers=[[Sublayer(kind, block.norm, block.mixer)]
                                      for kind, block in zip(self.layer_kinds(model.config), backbone.layers)],
                              residual_in_fp32=bool(model.config.residual_in_fp32))


MAMBA2 = Mamba2(
    name="mamba2",
    model_types=("mamba2",),
    config_keys={"hidden": "hidden_size", "mamba_heads": "num_heads", "mamba_head_dim": "head_dim",
                 "layer": "num_hidden_layers"},
    expected={"hidden": [("size", "hidden_size")],
              "mamba_heads": [("size", "num_heads"), ("unit", "head_dim"), ("fixed.ssm_state", "state_size")],
              "mamba_head_dim": [("size", "head_dim")]},
)
