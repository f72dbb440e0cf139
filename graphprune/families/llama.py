"""Llama and the decoders that share its config keys (Qwen2, Mistral): attention + MLP layers.

Its runtime for the explicit-state runner (export/stateful.py): each decoder layer is self-attention
after `input_layernorm` (RoPE from the backbone's `rotary_emb`; Qwen2's q/k/v biases live in the
projections), then the MLP after `post_attention_layernorm`. Sliding-window attention is passed on
per layer (`Llama.sliding_windows`): Mistral's `sliding_window` applies to every layer, Qwen2's to the
layers its `layer_types` mark "sliding_attention" (none unless `use_sliding_window`).
"""

from __future__ import annotations

import sys
from typing import Any

from .base import Family
from .runtime import StatefulLayout, Sublayer

# RoPE types whose frequencies depend on the longest position seen (recomputed in the forward pass): a
# decode step would not rotate as the prompt did, and the graph cannot be exported with that branch.
_DYNAMIC_ROPE = ("dynamic", "longrope")


class Llama(Family):
    def layer_kinds(self, config: Any) -> list[str]:
        return ["attention+mlp"] * config.num_hidden_layers

    def derive(self, new: Any, old: Any) -> None:
        # Qwen2 and Mistral derive head_dim as hidden // heads when the config has none: pin it
        new.head_dim = getattr(old, "head_dim", None) or old.hidden_size // old.num_attention_heads

    def keep_layers(self, new: Any, old: Any, kept_layers: list[int]) -> None:
        new.num_hidden_layers = len(kept_layers)
        if getattr(old, "layer_types", None):
            new.layer_types = [old.layer_types[i] for i in kept_layers]

    def stateful_layout(self, model: Any) -> StatefulLayout:
        backbone = model.model
        rope_type = getattr(backbone.rotary_emb, "rope_type", None)
        if rope_type in _DYNAMIC_ROPE:
            raise ValueError(f"stateful export: rope_type {rope_type!r} recomputes its RoPE frequencies from the "
                             "longest position in each forward, which prefill + decode cannot reproduce; supported: "
                             f"RoPE types other than {', '.join(_DYNAMIC_ROPE)}")
        windows = self.sliding_windows(model)
        layers = [[Sublayer("attention", layer.input_layernorm, layer.self_attn, window=window),
                   Sublayer("mlp", layer.post_attention_layernorm, layer.mlp)]
                  for layer, window in zip(backbone.layers, windows)]
        return StatefulLayout(embeddings=backbone.embed_tokens, layers=layers, final_norm=backbone.norm,
                              lm_head=model.lm_head, rotary=backbone.rotary_emb,
                              apply_rotary=sys.modules[type(backbone).__module__].apply_rotary_pos_emb)

    def sliding_windows(self, model: Any) -> list[int | None]:
        """Each layer's attention window as the model's forward applies it (None: full causal attention).
        Qwen2's attention holds its own (`sliding_window` on the layers `layer_types` marks
        "sliding_attention", which needs `use_sliding_window`); Mistral applies `config.sliding_window` to
        every layer (its default is 4096; `layer_types` is ignored); Llama has none."""
        config = model.config
        windows = []
        for layer in model.model.layers:
            if hasattr(layer.self_attn, "sliding_window"):
                window = layer.self_attn.sliding_window
            else:
                window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
            windows.append(None if window is None else int(window))
        return windows


LLAMA = Llama(
    name="llama",
    model_types=("llama", "qwen2", "mistral"),
    config_keys={"hidden": "hidden_size", "ffn": "intermediate_size", "attention_heads": "num_attention_heads",
                 "attention_head_dim": "head_dim", "layer": "num_hidden_layers"},
    expected={"hidden": [("size", "hidden_size")], "ffn": [("size", "intermediate_size")],
              "attention_heads": [("size", "num_attention_heads"), ("balanced_groups", "num_key_value_heads")]},
)
