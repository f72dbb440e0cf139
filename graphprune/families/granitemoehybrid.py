"""IBM Granite 4.0-H (`GraniteMoeHybridForCausalLM`): config keys derived, the runtime written.

Its config keys are found by `DerivedFamily` like any other model's (no key is written here); this
module adds what only the runtime needs: how the explicit-state runner (export/stateful.py) runs
its layers. Each decoder layer is two residual
branches: a Mamba2 mixer or an attention mixer after `input_layernorm`, then the shared MLP (plus,
with `num_local_experts > 0`, routed experts: kind "moe", which the runner refuses) after
`post_attention_layernorm`. Both branches are scaled by `residual_multiplier`; the embeddings by
`embedding_multiplier`; logits are divided by `logits_scaling`; attention scales scores by its
module's `scaling` (`attention_multiplier`), and RoPE applies where `position_embedding_type` is
"rope".
"""

from __future__ import annotations

import sys
from typing import Any

from dataclasses import dataclass

from .derived import DerivedFamily
from .runtime import StatefulLayout, Sublayer

# config.layers_block_type (transformers normalises "mamba"/"attention" to these) -> mixer kind
MIXER_KIND = {"linear_attention": "mamba", "mamba": "mamba", "full_attention": "attention", "attention": "attention"}


@dataclass
class GraniteMoeHybrid(DerivedFamily):
    def sublayer_kinds(self, config: Any) -> list[tuple[str, str]]:
        """Per layer, the kinds of its two residual branches: (mixer, feed-forward)."""
        ffn = "moe" if (getattr(config, "num_local_experts", 0) or 0) > 0 else "mlp"
        return [(MIXER_KIND.get(block, block), ffn) for block in config.layers_block_type]

    def stateful_layout(self, model: Any) -> StatefulLayout:
        config, backbone = model.config, model.model
        layers = []
        for (mixer_kind, ffn_kind), layer in zip(self.sublayer_kinds(config), backbone.layers):
            mixer = layer.mamba if layer.mamba is not None else layer.self_attn
            ffn = layer.block_sparse_moe if ffn_kind == "moe" else layer.shared_mlp
            layers.append([Sublayer(mixer_kind, layer.input_layernorm, mixer),
                           Sublayer(ffn_kind, layer.post_attention_layernorm, ffn)])
        rotary = getattr(backbone, "rotary_emb", None)
        return StatefulLayout(
            embeddings=backbone.embed_tokens, layers=layers, final_norm=backbone.norm, lm_head=model.lm_head,
            embedding_multiplier=float(config.embedding_multiplier),
            residual_multiplier=float(config.residual_multiplier), logits_divisor=float(config.logits_scaling),
            rotary=rotary,
            apply_rotary=sys.modules[type(backbone).__module__].apply_rotary_pos_emb if rotary is not None else None)


GRANITE_MOE_HYBRID = GraniteMoeHybrid(name="granitemoehybrid", model_types=("granitemoehybrid",))
