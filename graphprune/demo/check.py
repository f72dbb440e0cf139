"""Reference figures of the committed demo teacher, recorded once and re-checked by the tests.

    python -m graphprune.demo.check --write   # after training: record teacher_check.json
    python -m graphprune.demo.check           # recompute and compare
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
TEACHER = DEMO_DIR / "teacher"
RECORD = DEMO_DIR / "teacher_check.json"
SETTINGS = {"max_tokens": 8192, "seq_len": 256, "probes": ["mqar", "induction", "copy"], "probe_samples": 32,
            "seed": 1234}
MARGINS = {"perplexity_relative": 0.01, "probe_absolute": 0.05}


def teacher_figures() -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from graphprune.data import load_tokenizer
    from graphprune.evaluate import evaluate

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32)
    result = evaluate(model, load_tokenizer(str(TEACHER)), **SETTINGS)
    return {"perplexity": result["perplexity"], "tokens": result["tokens"], "probes": result["probes"],
            "settings": SETTINGS, "margins": MARGINS}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="record the figures (after training)")
    args = parser.parse_args()
    figures = teacher_figures()
    if args.write:
        RECORD.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
