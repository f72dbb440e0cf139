"""Benchmark: `graphprune inspect --meta` of a config (default: the Nemotron-H 8B architecture).

Runs the CLI in a fresh process (as a user would), measures wall time and the child's peak RSS,
and writes benchmarks/results/inspect_meta.json plus a markdown line.

    .venv/bin/python benchmarks/inspect_meta.py [CONFIG] [--repeats N]
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config", nargs="?", default="specs/models/nemotron-h-8b.json")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    walls, stages = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "graphprune.cli", "inspect", args.config, "--meta", "--json"],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        walls.append(time.perf_counter() - start)
        stages.append(json.loads(out.stdout)["seconds"])
    report = json.loads(out.stdout)
    peak_bytes = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result = {
        "config": args.config, "params": report["params"], "groups": len(report["groups"]),
        "wall_s_median": round(statistics.median(walls), 2), "wall_s_all": [round(w, 2) for w in walls],
        "stage_s_median": {k: round(statistics.median(s[k] for s in stages), 2) for k in stages[0]},
        "peak_rss_bytes": peak_bytes, "cpus": platform.machine() + f" x{len(__import__('os').sched_getaffinity(0))}",
    }
    out_path = ROOT / "benchmarks" / "results" / "inspect_meta.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"| {args.config} | {result['params']:,} | {result['wall_s_median']} s | "
          f"{peak_bytes / 2**30:.2f} GiB | {result['stage_s_median']} |")


if __name__ == "__main__":
    main()
