"""Benchmark: graphprune against Torch-Pruning on SmolLM2-135M after the *same* short healing.

The shapes are the peer's own (30/576/6/3/1152 at 25%, 30/576/6/3/640 at 50% of the non-embedding
parameters). graphprune's models are its best zero-shot recipe (query heads by `removal`, FFN by
`taylor`, then `reconstruct`); the peer's are Torch-Pruning's Taylor models written by
smollm2_torch_pruning.py. Every model is then distilled from the unpruned SmolLM2 with graphprune's
distillation, the same data, steps, batch and learning rate: the summaries of the titles before the
held-out ones, in order (never the held-out titles), packed into 256-token sequences. Perplexity is the
protocol's (../shared/PEERS.md), before and after.

Needs what smollm2_peers.py and smollm2_torch_pruning.py need (run the latter once first), then:

    .venv/bin/python benchmarks/smollm2_healing.py [--steps 200] [--batch 8] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from smollm2_peers import (HELDOUT_TITLES, PEER25, PEER50, REMOVAL, WORK, arch, converted_checkpoint,  # noqa: E402
                           perplexity, protocol_data, prune, summaries)

PEERS = Path.home() / ".cache" / "graphprune" / "peers"
RESULTS = ROOT / "results" / "smollm2_healing.json"
SEQ_LEN, LR, WARMUP = 256, 3e-4, 5


def healing_sequences(tokenizer, steps: int, batch: int) -> torch.Tensor:
    """steps x batch sequences of SEQ_LEN tokens (and 4 batches more for the KD eval), from the first titles
    (the held-out ones excluded)."""
    data = summaries()
    extracts = [data[t]["extract"] for t in sorted(data)][:-HELDOUT_TITLES]
    needed, ids = (steps + 4) * batch * SEQ_LEN, []
    for extract in extracts:
        ids.extend(tokenizer(extract + "\n\n", add_special_tokens=False)["input_ids"])
        if len(ids) >= needed:
            break
    count = len(ids) // SEQ_LEN
    return torch.tensor(ids[: count * SEQ_LEN]).view(count, SEQ_LEN)


STUDENTS = ("graphprune-25", "tp-taylor-25", "graphprune-50", "tp-taylor-50")
GRAPHPRUNE_TARGETS = {"graphprune-25": PEER25, "graphprune-50": PEER50}


def student_folder(name: str, checkpoint: Path, calibration: Path) -> Path:
    """graphprune's pruned model (pruned here, once, with its best zero-shot recipe) or the peer's."""
    folder = PEERS / name
    if (folder / "model.safetensors").is_file():
        return folder
    if name not in GRAPHPRUNE_TARGETS:
        raise SystemExit(f"{folder} is missing: run benchmarks/smollm2_torch_pruning.py first")
    prune(checkpoint, calibration, {"targets": GRAPHPRUNE_TARGETS[name], "importance": REMOVAL, "reconstruct": {}}, name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    (WORK / "out" / name).rename(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8, help="sequences of 256 tokens per step")
    parser.add_argument("--only", nargs="*", choices=STUDENTS, help="default: all, in this order")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from graphprune.distill import distill_in_process
    from graphprune.spec import DistillSpec

    torch.manual_seed(0)
    checkpoint = converted_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    windows, calibration = protocol_data(tokenizer)
    sequences = healing_sequences(tokenizer, args.steps, args.batch)
    train, holdout = sequences[: args.steps * args.batch], sequences[args.steps * args.batch:]
    teacher = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    spec = DistillSpec(seq_len=SEQ_LEN, micro_batch_size=args.batch, steps=args.steps, lr=LR, warmup_steps=WARMUP,
                       eval_batches=4)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.only or STUDENTS:
        student = AutoModelForCausalLM.from_pretrained(student_folder(name, checkpoint, calibration),
                                                       dtype=torch.float32).eval()
        before = perplexity(student, windows)
        start = time.perf_counter()
        WORK.mkdir(parents=True, exist_ok=True)
        result = distill_in_process(teacher, student, train, holdout, spec, console=None, scratch_in=WORK)
        student.eval()
        row = {"arch": arch(student.config), "zero_shot": round(before, 3), "healed": round(perplexity(student, windows), 3),
               "steps": result.steps, "tokens": result.tokens, "kd_eval_loss": round(result.eval_loss, 4),
               "distill_s": round(time.perf_counter() - start, 1),
               "healing": {"seq_len": SEQ_LEN, "micro_batch": args.batch, "lr": LR, "warmup": WARMUP,
                           "data": f"summaries of the first titles ({len(train)} sequences), held-out titles excluded"}}
        results[name] = row
        print(name, json.dumps(row), flush=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
