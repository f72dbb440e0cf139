"""Benchmark: importance methods on the demo teacher at the same pruned size, zero-shot and after the
same short distillation; and prune + distill against training that architecture from scratch.

Methods: group-aware nested activations (the paper) vs group-unaware (global head ranking, groups
refilled in rank order) vs magnitude vs random.  For each: held-out perplexity and probe accuracies
zero-shot, then after `--distill-steps` of logit KD from the teacher on the demo corpus (the same
data order for all).  From scratch: the group-aware pruned architecture, randomly initialised,
trained with the LM loss on the same data until its held-out loss reaches that of group-aware
prune + distill (or `--scratch-steps` run out); the tokens it needed are the comparison.

    .venv/bin/python benchmarks/demo_importance.py [--distill-steps 200] [--scratch-steps 2000]
    .venv/bin/python benchmarks/demo_importance.py --targets '{"mamba_num_heads": 8}' --distill-steps 0 \
        --out benchmarks/results/demo_importance_ssm_only.json     # SSM heads only, zero-shot
    .venv/bin/python benchmarks/demo_importance.py --targets '{"mamba_num_heads": 8}' --distill-steps 0 \
        --calibration-probe-fraction 0.25 --out benchmarks/results/demo_importance_ssm_only_recall.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from graphprune.distill import heldout_loss

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "graphprune" / "demo"
METHODS = {
    "group-aware activation (paper)": {},
    "group-unaware activation": {"group_aware": False},
    "magnitude": {"hidden": "magnitude", "ffn": "magnitude", "mamba": "magnitude", "attention": "magnitude"},
    "random": {"hidden": "random", "ffn": "random", "mamba": "random", "attention": "random"},
}


def from_scratch(config, train: torch.Tensor, holdout: torch.Tensor, target: float, steps: int, batch: int,
                 lr: float, eval_every: int) -> dict:
    """LM training of a fresh model of `config`; held-out loss every `eval_every` steps until `target`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = min(100, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    curve, start, reached = [], time.perf_counter(), None
    for step in range(1, steps + 1):
        rows = order[((step - 1) * batch + torch.arange(batch)) % len(train)]
        ids = train[rows]
        model.train()
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % eval_every == 0 or step == steps:
            held = heldout_loss(model, holdout, 8)
            curve.append({"step": step, "tokens": step * ids.numel(), "heldout_loss": round(held, 4)})
            print("scratch", json.dumps(curve[-1]), flush=True)
            if held <= target:
                reached = curve[-1]["tokens"]
                break
    return {"curve": curve, "tokens_to_reach_target": reached, "target_loss": round(target, 4),
            "seconds": round(time.perf_counter() - start, 1), "lr": lr}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--probe-samples", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--distill-steps", type=int, default=200, help="0: zero-shot only")
    parser.add_argument("--scratch-steps", type=int, default=2000, help="0: no from-scratch run")
    parser.add_argument("--targets", default=json.dumps(json.loads((ROOT / "specs" / "demo.json").read_text())["targets"]))
    parser.add_argument("--calibration-probe-fraction", type=float, default=0.0,
                        help="share of calibration sequences that are probe sequences (recall-aware scores)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_importance.json")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from graphprune.apply import apply
    from graphprune.data import load_tokenizer
    from graphprune.distill import distill_in_process, training_samples
    from graphprune.evaluate import evaluate
    from graphprune.spec import DistillSpec, parse_spec

    teacher_path = DEMO / "teacher"
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    tokenizer = load_tokenizer(str(teacher_path))
    corpus = {"path": str(DEMO / "corpus" / "train.txt.gz")}
    distill_spec = DistillSpec(data=corpus, seq_len=256, micro_batch_size=8, steps=max(args.distill_steps, 1), lr=1e-3,
                               warmup_steps=10)
    train, holdout = training_samples(distill_spec, None, tokenizer)
    holdout = holdout[:32]
    options = {"probe_samples": args.probe_samples, "max_tokens": args.max_tokens}
    rows = {"teacher (unpruned)": {"zero_shot": {**evaluate(teacher, tokenizer, **options),
                                                 "heldout_loss": heldout_loss(teacher, holdout, 8)}}}
    for label, importance in METHODS.items():
        out = Path(tempfile.gettempdir()) / "graphprune-bench-importance" / label.split()[0]
        spec = parse_spec({
            "model": {"path": str(teacher_path)},
            "calibration": {"data": corpus, "num_samples": args.samples, "seq_len": 256, "batch_size": 8,
                            "probe_fraction": args.calibration_probe_fraction},
            "importance": importance, "targets": json.loads(args.targets), "output": str(out),
            "passes": [{"name": n} for n in ("calibrate", "plan", "prune", "materialize", "verify")]})
        report = apply(spec, force=True)
        student = AutoModelForCausalLM.from_pretrained(out).eval()
        rows[label] = {"params": report["pruned"]["params"], "config": report["pruned"]["config"],
                       "zero_shot": {**evaluate(student, tokenizer, **options),
                                     "heldout_loss": heldout_loss(student, holdout, 8)}}
        if args.distill_steps:
            result = distill_in_process(teacher, student, train, holdout, distill_spec, console=None, scratch_in=out)
            rows[label]["distilled"] = {**evaluate(student, tokenizer, **options),
                                        "heldout_loss": heldout_loss(student, holdout, 8), "kd": result.summary()}
        print(label, json.dumps({k: v for k, v in rows[label].items() if k != "config"}), flush=True)
        if label.startswith("group-aware"):
            pruned_config = student.config
    result = {"targets": json.loads(args.targets), "calibration_samples": args.samples,
              "calibration_probe_fraction": args.calibration_probe_fraction,
              "distill": distill_spec.model_dump(mode="json"), "heldout_sequences": len(holdout), "results": rows}
    if args.scratch_steps and args.distill_steps:
        target = rows["group-aware activation (paper)"]["distilled"]["heldout_loss"]
        result["from_scratch"] = from_scratch(pruned_config, train, holdout, target, args.scratch_steps,
                                              batch=8, lr=2e-3, eval_every=100)
        result["from_scratch"]["prune_distill_tokens"] = args.distill_steps * 8 * 256
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["| method | stage | perplexity | held-out loss | MQAR | induction | copy |", "|---|---|---:|---:|---:|---:|---:|"]
    for label, row in result["results"].items():
        for stage in ("zero_shot", "distilled"):
            if stage in row:
                r = row[stage]
                p = r["probes"]
                lines.append(f"| {label} | {stage.replace('_', '-')} | {r['perplexity']:.1f} | {r['heldout_loss']:.3f} "
                             f"| {p['mqar']:.3f} | {p['induction']:.3f} | {p['copy']:.3f} |")
    scratch = result.get("from_scratch")
    if scratch:
        reached = scratch["tokens_to_reach_target"]
        lines.append("")
        lines.append(f"From scratch (same architecture, LM loss, lr {scratch['lr']}): "
                     + (f"reached the prune + distill held-out loss {scratch['target_loss']} after {reached:,} tokens"
                        if reached else f"did not reach {scratch['target_loss']} within {scratch['curve'][-1]['tokens']:,} "
                        f"tokens (best {min(c['heldout_loss'] for c in scratch['curve'])})")
                     + f"; prune + distill used {scratch['prune_distill_tokens']:,} tokens.")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
