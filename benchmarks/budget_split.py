"""Benchmark: a parameter budget spent by one common shrink factor against the split chosen by loss.

`targets.params` alone; `importance.split_candidates: 1` is the common factor (hidden, FFN and Mamba
heads shrunk alike), the default (6) builds six ways to spend the budget and keeps the one with the
lowest LM loss on 4 calibration sequences (the `choose_split` pass). Both then run the same recipe
(calibrate, plan, prune, reconstruct, materialize); the held-out perplexity decides.

    .venv/bin/python benchmarks/budget_split.py --model demo       # the demo teacher, ~50% budget
    .venv/bin/python benchmarks/budget_split.py --model smollm2    # SmolLM2-135M, PEERS.md protocol, 25%

Results go to benchmarks/results/budget_split.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "results" / "budget_split.json"
DEMO = ROOT.parent / "graphprune" / "demo"


def demo_setup() -> tuple[dict, Callable[[Path], float]]:
    from graphprune.evaluate import evaluate_path

    spec = {"model": {"path": str(DEMO / "teacher")},
            "calibration": {"data": {"path": str(DEMO / "corpus" / "train.txt.gz")}, "num_samples": 32, "seq_len": 256,
                            "batch_size": 8},
            "targets": {"params": 1_900_000}}

    def heldout(folder: Path) -> float:
        return evaluate_path(str(folder), data=DEMO / "corpus" / "valid.txt.gz", probes=[], max_tokens=16384)["perplexity"]

    return spec, heldout


def smollm2_setup() -> tuple[dict, Callable[[Path], float]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from smollm2_peers import CALIBRATION_SEQUENCES, TAYLOR, WINDOW, converted_checkpoint, perplexity, protocol_data

    checkpoint = converted_checkpoint()
    windows, calibration = protocol_data(AutoTokenizer.from_pretrained(checkpoint))
    spec = {"model": {"path": str(checkpoint)},
            "calibration": {"data": {"path": str(calibration)}, "num_samples": CALIBRATION_SEQUENCES, "seq_len": WINDOW,
                            "batch_size": 4},
            "importance": TAYLOR, "targets": {"params": 107_972_928}}  # 25% of the non-embedding parameters

    def heldout(folder: Path) -> float:
        return perplexity(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), windows)

    return spec, heldout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=("demo", "smollm2"), default="demo")
    args = parser.parse_args()
    from graphprune.apply import apply
    from graphprune.spec import parse_spec

    torch.manual_seed(0)
    base, heldout = demo_setup() if args.model == "demo" else smollm2_setup()
    work = Path("/tmp/graphprune-budget-split")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name, candidates in (("common-factor", 1), ("chosen-split", 6)):
        spec = {**base, "importance": {**base.get("importance", {}), "split_candidates": candidates},
                "output": str(work / args.model)}  # one folder: the second run reuses the first's scores
        start = time.perf_counter()
        report = apply(parse_spec(spec), force=True)
        row = {"config": report["pruned"]["config"], "params": report["pruned"]["params"],
               "perplexity": round(heldout(work / args.model), 3), "apply_s": round(time.perf_counter() - start, 1),
               "budget_split": report.get("budget_split")}
        results[f"{args.model}/{name}"] = row
        print(name, json.dumps({k: v for k, v in row.items() if k != "budget_split"}), flush=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
