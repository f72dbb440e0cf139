"""benchmarks/gpu_check.sh runs end to end on CPU with --dry-run: every step printed and recorded."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_prints_and_records_every_step(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out"), "--dry-run"],
                          capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    steps = ["install", "models", "kernels", "trtllm", "bench-torch", "bench-trtllm"]
    assert [s["step"] for s in results["steps"]] == steps and results["failed"] == []
    assert all(s["dry_run"] and "wall_s" in s for s in results["steps"])
    for name in steps:
        assert f"== {name}:" in done.stderr
    bench = next(s for s in results["steps"] if s["step"] == "bench-trtllm")["result"]["would_run"]
    assert "--engine trtllm --device cuda" in bench and "nemotron-h-mid-pruned" in bench
    assert not (tmp_path / "out" / "models").exists()  # nothing was built
