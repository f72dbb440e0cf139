"""IBM Bamba (`BambaForCausalLM`): config keys derived, the runtime written.

Its config keys are found by `DerivedFamily` (no key is written here); this module tells the
explicit-state runner (export/stateful.py) how its layers run: each decoder layer is a Mamba2 or
attention mixer after `input_layernorm`, then the MLP after `pre_ff_layernorm`, with RoPE in the
attention layers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .derived import DerivedFamily
from .runtime import StatefulLayout, Sublayer


@dataclass
class Bamba(DerivedFamily):
    def stateful_layout(self, model: Any) -> StatefulLayout:
        backbone = model.model
        layers = []
        for layer in backbone.layers:  # a layer has either a `mamba` or a `self_attn` module
            mamba = getattr(layer, "mamba", None)
            layers.append([Sublayer("mamba" if mamba is not None else "attention", layer.input_layernorm,
                                    mamba if mamba is not None else layer.self_attn),
                           Sublayer("mlp", layer.pre_ff_layernorm, layer.feed_forward)])
        return StatefulLayout(embeddings=backbone.embed_tokens, layers=layers, final_norm=backbone.final_layernorm,
                              lm_head=model.lm_head, rotary=backbone.rotary_emb,
                              apply_rotary=sys.modules[type(backbone).__module__].apply_rotary_pos_emb)


BAMBA = Bamba(name="bamba", model_types=("bamba",))
