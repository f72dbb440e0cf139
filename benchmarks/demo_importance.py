"""Benchmark: importance methods on the demo teacher at the same pruned size (zero-shot).

group-aware nested activations (the paper) vs group-unaware (global head ranking, groups refilled
in rank order) vs magnitude vs random; perplexity on the held-out split and probe accuracies.
The distillation half of the comparison comes with `graphprune distill`.

    .venv/bin/python benchmarks/demo_importance.py [--samples 32] [--probe-samples 64]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "graphprune" / "demo"
METHODS = {
    "group-aware activation (paper)": {},
    "group-unaware activation": {"group_aware": False},
    "activation, heads at full head_dim": {"mamba_nested": False},
    "magnitude": {"hidden": "magnitude", "ffn": "magnitude", "mamba": "magnitude", "attention": "magnitude"},
    "random": {"hidden": "random", "ffn": "random", "mamba": "random", "attention": "random"},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--probe-samples", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--targets", default=json.dumps(json.loads((ROOT / "specs" / "demo.json").read_text())["targets"]))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from graphprune.apply import apply
    from graphprune.data import load_tokenizer
    from graphprune.evaluate import evaluate
    from graphprune.spec import parse_spec

    teacher = DEMO / "teacher"
    tokenizer = load_tokenizer(str(teacher))
    options = {"probe_samples": args.probe_samples, "max_tokens": args.max_tokens}
    rows = {"teacher (unpruned)": evaluate(AutoModelForCausalLM.from_pretrained(teacher), tokenizer, **options)}
    for label, importance in METHODS.items():
        out = Path("/tmp/graphprune-bench-importance") / label.split()[0]
        spec = parse_spec({
            "model": {"path": str(teacher)},
            "calibration": {"data": {"path": str(DEMO / "corpus" / "train.txt.gz")}, "num_samples": args.samples,
                            "seq_len": 256, "batch_size": 8},
            "importance": importance, "targets": json.loads(args.targets), "output": str(out),
            "passes": [{"name": n} for n in ("calibrate", "plan", "prune", "materialize", "verify")]})
        start = time.perf_counter()
        report = apply(spec, force=True)
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        rows[label] = {**evaluate(model, tokenizer, **options), "params": report["pruned"]["params"],
                       "apply_s": round(time.perf_counter() - start, 1)}
        print(label, json.dumps(rows[label]), flush=True)
    result = {"targets": json.loads(args.targets), "calibration_samples": args.samples, "results": rows}
    (ROOT / "benchmarks" / "results" / "demo_importance.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| method | params | perplexity | mqar | induction | copy |\n|---|---|---|---|---|---|")
    for label, row in rows.items():
        probes = row["probes"]
        print(f"| {label} | {row.get('params', '')} | {row['perplexity']:.1f} | {probes['mqar']:.3f} | "
              f"{probes['induction']:.3f} | {probes['copy']:.3f} |")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
