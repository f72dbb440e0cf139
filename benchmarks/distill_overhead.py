"""Benchmark: distillation throughput against its bare compute, and KD against plain LM fine-tuning.

On the demo teacher and its pruned student (pruned here with the demo's targets, zero-shot):
1. tokens/s of `graphprune.distill` next to the bare cost of the same work (teacher forward +
   student forward/backward + optimizer step on the same batches), measured in the same run;
2. held-out next-token loss and KD loss after the same token budget, for KD (the paper's
   logit-only KL) and for plain LM-loss fine-tuning of the same pruned student.

    .venv/bin/python benchmarks/distill_overhead.py [--steps 60]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "graphprune" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from graphprune.apply import apply
    from graphprune.data import load_tokenizer
    from graphprune.distill import distill, kd_loss, lm_loss, training_samples
    from graphprune.spec import DataSpec, DistillSpec, parse_spec

    demo = json.loads((ROOT / "specs" / "demo.json").read_text())
    student_dir = Path(tempfile.mkdtemp()) / "student"
    apply(parse_spec({"model": {"path": str(DEMO / "teacher")},
                      "calibration": {**demo["calibration"], "data": {"path": str(DEMO / "corpus" / "train.txt.gz")}},
                      "targets": demo["targets"], "output": str(student_dir),
                      "passes": [{"name": n} for n in ("calibrate", "plan", "prune", "materialize")]}), force=True)
    teacher = AutoModelForCausalLM.from_pretrained(DEMO / "teacher").eval()
    pruned = AutoModelForCausalLM.from_pretrained(student_dir)
    tokenizer = load_tokenizer(str(DEMO / "teacher"))
    spec = DistillSpec(data=DataSpec(path=str(DEMO / "corpus" / "train.txt.gz")), seq_len=args.seq_len,
                       micro_batch_size=args.micro_batch, steps=args.steps, lr=1e-3, warmup_steps=5, eval_batches=8)
    train, holdout = training_samples(spec, None, tokenizer)

    # 1. bare compute on the first batches, then the real thing
    student = copy.deepcopy(pruned).train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    warmup, bare_steps = 2, min(20, args.steps)

    def timed_from(step: int) -> float:
        return time.perf_counter() if step == warmup else start

    start = 0.0
    for step in range(warmup + bare_steps):
        start = timed_from(step)
        ids = train[step * args.micro_batch:(step + 1) * args.micro_batch]
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids, use_cache=False).logits
        loss = kd_loss(student(input_ids=ids, use_cache=False).logits, teacher_logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    bare_tokens_per_s = bare_steps * args.micro_batch * args.seq_len / (time.perf_counter() - start)  # after warm-up

    results = {}
    for label, weights in (("kd", {"kd_weight": 1.0, "lm_weight": 0.0}), ("lm", {"kd_weight": 0.0, "lm_weight": 1.0})):
        student = copy.deepcopy(pruned)
        with tempfile.TemporaryDirectory() as workdir:
            result = distill(teacher, student, train, holdout, spec.model_copy(update=weights), Path(workdir))
        student.eval()
        with torch.no_grad():
            batches = holdout.split(args.micro_batch)[:8]
            held_lm = sum(lm_loss(student(input_ids=b, use_cache=False).logits, b).item() for b in batches) / len(batches)
        results[label] = {"tokens": result.tokens, "tokens_per_s": round(result.tokens_per_s, 1),
                          "heldout_kd_loss": round(result.eval_loss if label == "kd" else _kd(teacher, student, holdout, spec), 4),
                          "heldout_lm_loss": round(held_lm, 4)}
        print(label, results[label], flush=True)
    with torch.no_grad():
        batches = holdout.split(args.micro_batch)[:8]
        zero_shot_lm = sum(lm_loss(pruned(input_ids=b, use_cache=False).logits, b).item() for b in batches) / len(batches)
        teacher_lm = sum(lm_loss(teacher(input_ids=b, use_cache=False).logits, b).item() for b in batches) / len(batches)
    summary = {
        "steps": args.steps, "tokens_per_step": args.micro_batch * args.seq_len, "threads": torch.get_num_threads(),
        "distill_tokens_per_s": results["kd"]["tokens_per_s"], "bare_tokens_per_s": round(bare_tokens_per_s, 1),
        "overhead_ratio": round(bare_tokens_per_s / results["kd"]["tokens_per_s"], 3),
        "teacher_heldout_lm_loss": round(teacher_lm, 4), "pruned_zero_shot_heldout_lm_loss": round(zero_shot_lm, 4),
        "after_budget": results,
    }
    (ROOT / "benchmarks" / "results" / "distill.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


def _kd(teacher, student, holdout, spec) -> float:
    from graphprune.distill import World, evaluate_kd

    return evaluate_kd(teacher, student, holdout, spec, World())


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
