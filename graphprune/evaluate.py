"""`graphprune eval`: held-out perplexity and sequence-modelling probe accuracies of a causal LM."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .data import load_texts, load_tokenizer, read_text
from .spec import DataSpec

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEFAULT_DATA = DEMO_DIR / "corpus" / "valid.txt.gz"


@torch.no_grad()
def perplexity(model: Any, ids: torch.Tensor, seq_len: int, batch_size: int = 8) -> tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping windows of `seq_len` tokens."""
    windows = ids[: (len(ids) - 1) // seq_len * seq_len + 1]
    inputs = windows[:-1].view(-1, seq_len)
    targets = windows[1:].view(-1, seq_len)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    inputs, targets = inputs.to(device), targets.to(device)
    for start in range(0, len(inputs), batch_size):
        logits = model(input_ids=inputs[start:start + batch_size], use_cache=False).logits.float()
        total += F.cross_entropy(logits.flatten(0, 1), targets[start:start + batch_size].flatten(), reduction="sum").item()
        count += targets[start:start + batch_size].numel()
    return math.exp(total / max(count, 1)), count


def text_tokens(tokenizer: Any, data: str | Path, max_tokens: int, join: str = "documents") -> torch.Tensor:
    """Held-out token ids. `documents`: the file's documents (blank-line separated blocks, JSONL rows)
    each tokenized without special tokens, EOS between them. `raw`: the whole file as one string,
    tokenized once without special tokens (the protocol of most published perplexities)."""
    if join == "raw":
        ids = tokenizer(read_text(Path(data)), add_special_tokens=False)["input_ids"]
        return torch.tensor(ids[: max_tokens + 1], dtype=torch.long)
    if join != "documents":
        raise ValueError(f"join: {join!r}; choose 'documents' or 'raw'")
    texts = load_texts(DataSpec(path=str(data)))
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        if len(ids) > max_tokens:
            break
    return torch.tensor(ids[: max_tokens + 1], dtype=torch.long)


def uses_demo_tokenizer(tokenizer: Any) -> bool:
    """The probes are token-id sequences in the demo tokenizer's layout: meaningful for its models only."""
    from .data import load_tokenizer as load

    return tokenizer.get_vocab() == load(str(DEMO_DIR)).get_vocab()


def evaluate(model: Any, tokenizer: Any, data: str | Path | None = None, probes: list[str] | None = None,
             seq_len: int = 256, max_tokens: int = 32768, probe_samples: int = 64, seed: int = 0,
             join: str = "documents") -> dict[str, Any]:
    """Perplexity over non-overlapping windows of `seq_len` input tokens (each predicts its seq_len next tokens:
    the last target is the next window's first token), and the probes (`probes=None`: all of them if the model uses the demo
    tokenizer, none otherwise)."""
    from .demo.probes import COPY_TOKENS, PROBES, evaluate_probes

    model.eval()
    ids = text_tokens(tokenizer, data or DEFAULT_DATA, max_tokens, join)
    ppl, tokens = perplexity(model, ids, seq_len)
    names = (list(PROBES) if uses_demo_tokenizer(tokenizer) else []) if probes is None else probes
    unknown = [n for n in names if n not in PROBES]
    if unknown:
        raise ValueError(f"unknown probe {', '.join(unknown)}; choose from {', '.join(PROBES)}")
    vocab = model.get_input_embeddings().num_embeddings
    if names and vocab < COPY_TOKENS[1]:
        raise ValueError(f"the probes use token ids up to {COPY_TOKENS[1] - 1} (the demo tokenizer's layout), "
                         f"but this model's vocabulary has {vocab}; run with --probes ''")
    scores = evaluate_probes(model, names, seq_len=seq_len, n=probe_samples, seed=seed) if names else {}
    return {"perplexity": ppl, "tokens": tokens, "probes": scores}


def evaluate_path(model_path: str, **kwargs: Any) -> dict[str, Any]:
    """`graphprune eval`: load a model folder (or hub id) in float32 and evaluate it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return evaluate(model, load_tokenizer(model_path), **kwargs)
