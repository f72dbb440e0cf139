"""Tiny checkpoints on disk (with the demo tokenizer) and calibration text, for end-to-end tests."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch

from models import _randomized

DEMO = Path(__file__).resolve().parent.parent / "graphprune" / "demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VOCAB = 4096


def nemotron_h_config(pattern: str = "M-M*-"):
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=VOCAB, hidden_size=48, hybrid_override_pattern=pattern, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, intermediate_size=80, mamba_num_heads=8, mamba_head_dim=6,
        n_groups=2, ssm_state_size=8, chunk_size=16, conv_kernel=4, tie_word_embeddings=False)


def mamba2_config():
    from transformers import Mamba2Config

    return Mamba2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, n_groups=2,
                        state_size=8, expand=2, chunk_size=16, tie_word_embeddings=False)


def llama_config(tied: bool = False):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)


def write_checkpoint(config, folder: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = _randomized(AutoModelForCausalLM.from_config(config))
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / name, folder / name)
    return folder


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def original(workspace, model):
    """The checkpoint `workspace[model]` reloaded with transformers' own class."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(workspace[model]).eval()


def write_text(path: Path, chars: int = 120_000) -> Path:
    with gzip.open(DEMO / "corpus" / "valid.txt.gz", "rt", encoding="utf-8") as f:
        path.write_text(f.read(chars))
    return path
