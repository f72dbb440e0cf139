"""Benchmark: deployment speed of original against pruned models, torch and onnxruntime engines (CPU).

Two pairs, each measured by `graphprune.bench` (every model in its own process, warm-up, median):

* the demo teacher (3.8M) against its pruned half (specs/demo.json targets, zero-shot weights:
  speed does not depend on them);
* a Nemotron-H of the 8B's shape at a width that fits this machine (hidden 1024, 18 layers of the
  8B pattern, its groups, state and attention head size, Mamba head_dim 32, random weights) against the paper's 8B->4B widths scaled alike
  (hidden x0.75, FFN x0.57, Mamba heads x0.875), pruned by magnitude (no data needed).

Next to each measured speed-up stands the ideal one: the ratio of matmul parameters (FLOPs per
token up to attention scores, which are small at these lengths).

    .venv/bin/python benchmarks/export_speed.py [--threads 1] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "graphprune" / "bench-export"
MID_CONFIG = {  # the 8B's groups, state and attention heads; a quarter of its width; 18 of its 52 layers
    "vocab_size": 32000, "hidden_size": 1024, "hybrid_override_pattern": "M-M-M-M*-M-M-M-M*-",
    "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 5376,
    "mamba_num_heads": 64, "mamba_head_dim": 32, "n_groups": 8, "ssm_state_size": 128, "chunk_size": 128,
    "conv_kernel": 4, "tie_word_embeddings": False, "mlp_hidden_act": "relu2",
}
MID_TARGETS = {"hidden_size": 768, "ffn_hidden_size": 3072, "mamba_num_heads": 56}


def prune(model: Path, targets: dict, out: Path, calibration: bool) -> Path:
    from graphprune.apply import apply
    from graphprune.spec import parse_spec

    if (out / "config.json").is_file():
        return out
    spec = {"model": {"path": str(model)}, "targets": targets, "output": str(out),
            "passes": [{"name": n} for n in ("calibrate", "plan", "prune", "materialize")]}
    if calibration:
        spec["calibration"] = {"data": {"path": str(ROOT / "graphprune/demo/corpus/train.txt.gz")}, "num_samples": 16,
                               "seq_len": 256}
    else:
        spec["importance"] = {k: "magnitude" for k in ("hidden", "ffn", "mamba", "attention")}
    apply(parse_spec(spec), force=True)
    return out


def mid_size_model() -> Path:
    import torch
    from transformers import AutoModelForCausalLM, NemotronHConfig

    out = CACHE / "nemotron-h-mid"
    if not (out / "config.json").is_file():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(NemotronHConfig(**MID_CONFIG)).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "export_speed.json")
    args = parser.parse_args()

    from graphprune.bench import BenchSettings, bench, plot

    teacher = ROOT / "graphprune" / "demo" / "teacher"
    demo_targets = json.loads((ROOT / "specs" / "demo.json").read_text())["targets"]
    mid = mid_size_model()
    pairs = {
        "demo": (teacher, prune(teacher, demo_targets, CACHE / "demo-pruned", calibration=True)),
        "nemotron-h-mid": (mid, prune(mid, MID_TARGETS, CACHE / "nemotron-h-mid-pruned", calibration=False)),
    }
    results = {"settings": vars(args) | {"out": str(args.out)}, "runs": {}}
    for name, (original, pruned) in pairs.items():
        for engine in ("torch", "onnxruntime"):
            settings = BenchSettings(engine=engine, input_len=args.input_len, output_len=args.output_len,
                                     repeats=args.repeats, threads=args.threads)
            start = time.perf_counter()
            report = bench([str(original), str(pruned)], settings, labels=[f"{name}", f"{name} pruned"],
                           progress=lambda what: print(what, flush=True))
            report["wall_s"] = round(time.perf_counter() - start, 1)
            results["runs"][f"{name}/{engine}"] = report
            plot(report, args.out.with_name(f"export_speed_{name}_{engine}.png"))
            print(json.dumps({k: {m: round(v, 3) if isinstance(v, float) else v for m, v in r.items()
                                  if not isinstance(v, list)} for k, r in enumerate(report["results"])}), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| pair / engine | params | prefill tok/s | decode tok/s | peak MiB | prefill x | decode x | ideal x |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, report in results["runs"].items():
        for r in report["results"]:
            lines.append(f"| {r['model']} / {key.split('/')[1]} | {r['params'] / 1e6:.1f}M | {r['prefill_tokens_per_s']:,.0f} "
                         f"| {r['decode_tokens_per_s']:,.1f} | {r['peak_memory_bytes'] / 2**20:,.0f} "
                         f"| {r['prefill_speedup_vs_first']:.2f} | {r['decode_speedup_vs_first']:.2f} "
                         f"| {r['ideal_speedup_vs_first']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
