"""The steps of benchmarks/gpu_check.sh (one GPU, under 8 minutes): each prints one JSON line of results.

    python benchmarks/gpu_check.py STEP OUT_DIR [--dry-run]

Steps: `models` (the demo teacher and its pruned student; the 227M Nemotron-H "mid" pair of
benchmarks/export_speed.py), `kernels` (mamba-ssm's CUDA kernel path against the PyTorch path on both
demo models: max |dlogit|), `trtllm` (export the student for TensorRT-LLM, load it in its LLM API and
generate), `bench-torch` / `bench-trtllm` (`graphprune bench` of the 227M pair on cuda). With --dry-run
a step prints what it would do and runs nothing that needs a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

STEPS = ("models", "kernels", "trtllm", "bench-torch", "bench-trtllm")


def pairs(out: Path) -> dict[str, tuple[Path, Path]]:
    return {"demo": (ROOT / "graphprune" / "demo" / "teacher", out / "models" / "demo-pruned"),
            "mid": (out / "models" / "nemotron-h-mid", out / "models" / "nemotron-h-mid-pruned")}


def models(out: Path, dry_run: bool) -> dict:
    """The two pairs, pruned with magnitude scores (no data needed; the check is of kernels, not quality)."""
    from export_speed import MID_CONFIG, MID_TARGETS, prune

    (teacher, student), (mid, mid_pruned) = pairs(out).values()
    demo_targets = json.loads((ROOT / "specs" / "demo.json").read_text())["targets"]
    if dry_run:
        return {"would_write": [str(student), str(mid), str(mid_pruned)], "mid_config": MID_CONFIG}
    import torch
    from transformers import AutoModelForCausalLM, NemotronHConfig

    prune(teacher, demo_targets, student, calibration=False)
    if not (mid / "config.json").is_file():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(NemotronHConfig(**MID_CONFIG)).save_pretrained(mid)
    prune(mid, MID_TARGETS, mid_pruned, calibration=False)
    return {"written": [str(student), str(mid), str(mid_pruned)]}


def kernels(out: Path, dry_run: bool) -> dict:
    """Logits on cuda with mamba-ssm's kernels (transformers uses them when they import) against the
    PyTorch reference path (use_mamba_kernels=False), float32, for the teacher and the student."""
    teacher, student = pairs(out)["demo"]
    if dry_run:
        return {"would_compare": [str(teacher), str(student)], "path": "use_mamba_kernels True vs False on cuda"}
    import torch
    from transformers import AutoModelForCausalLM

    results = {}
    for name, folder in (("teacher", teacher), ("student", student)):
        ids = torch.randint(0, 4096, (2, 256), generator=torch.Generator().manual_seed(0)).cuda()
        logits = {}
        for kernels_on in (True, False):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                         use_mamba_kernels=kernels_on).cuda().eval()
            with torch.no_grad():
                logits[kernels_on] = model(input_ids=ids, use_cache=False).logits.float()
        results[name] = {"max_abs_dlogit": (logits[True] - logits[False]).abs().max().item()}
    import mamba_ssm  # noqa: F401 - the kernels were importable, so the first path used them

    return results


def trtllm(out: Path, dry_run: bool) -> dict:
    """The student through `graphprune export --format trtllm`, loaded by TensorRT-LLM's LLM API."""
    _, student = pairs(out)["demo"]
    folder = out / "export" / "trtllm"
    command = [sys.executable, "-m", "graphprune.cli", "export", str(student), "--format", "trtllm", "--out",
               str(folder), "--force", "--json"]
    if dry_run:
        return {"would_run": " ".join(command), "then": "tensorrt_llm.LLM(folder).generate(3 prompts, 16 tokens)"}
    subprocess.run(command, check=True, capture_output=True, text=True)
    from tensorrt_llm import LLM, SamplingParams
    from tensorrt_llm.llmapi import KvCacheConfig

    llm = LLM(model=str(folder), kv_cache_config=KvCacheConfig(enable_block_reuse=False,
                                                               mamba_ssm_cache_dtype="float32"))
    outputs = llm.generate([[1, 2, 3, 4], [5, 6, 7], [8, 9]], SamplingParams(max_tokens=16, ignore_eos=True))
    return {"generated_tokens": [len(o.outputs[0].token_ids) for o in outputs]}


def bench(out: Path, dry_run: bool, engine: str) -> dict:
    original, pruned = pairs(out)["mid"]
    command = [sys.executable, "-m", "graphprune.cli", "bench", str(original), str(pruned), "--engine", engine,
               "--device", "cuda", "--input-len", "512", "--output-len", "128", "--batch", "8", "--repeats", "5",
               "--json", "--plot", ""]
    if dry_run:
        return {"would_run": " ".join(command)}
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    report = json.loads(done.stdout)
    return {r["model"]: {k: r[k] for k in ("params", "prefill_tokens_per_s", "decode_tokens_per_s",
                                           "peak_memory_bytes", "speedup_vs_first", "speedup_range")}
            for r in report["results"]}


def main() -> None:
    step, out = sys.argv[1], Path(sys.argv[2])
    dry_run = "--dry-run" in sys.argv[3:]
    if step not in STEPS:
        raise SystemExit(f"unknown step {step!r}; steps: {', '.join(STEPS)}")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run = {"models": models, "kernels": kernels, "trtllm": trtllm,
           "bench-torch": lambda o, d: bench(o, d, "torch"), "bench-trtllm": lambda o, d: bench(o, d, "trtllm")}[step]
    result = run(out, dry_run)
    print(json.dumps({"step": step, "dry_run": dry_run, "seconds": round(time.perf_counter() - start, 1),
                      "result": result}))


if __name__ == "__main__":
    main()
