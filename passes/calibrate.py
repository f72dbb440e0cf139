"""calibrate: measure activation scores at every site the analysis names, in one pass over the data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from graphprune.data import calibration_batches, load_tokenizer
from graphprune.importance import activation_sites, collect_activations
from graphprune.pipeline import PassContext, PassResult, register_pass

# Not a top-level *.safetensors: runtimes (TensorRT-LLM, vLLM) load every such file as model weights.
SCORES_FILE = "scores/activations.safetensors"
KIND_METHOD = {"hidden": "hidden", "ffn": "ffn", "mamba_heads": "mamba", "attention_heads": "attention"}


def needed_sites(ctx: PassContext) -> list:
    methods = ctx.spec.importance
    return [site for group in ctx.analysis.groups if group.kind in KIND_METHOD
            and getattr(methods, KIND_METHOD[group.kind]) == "activation"
            for site in activation_sites(ctx.analysis, group)]


def ensure_batches(ctx: PassContext) -> list:
    if ctx.batches is None:
        calibration = ctx.spec.calibration
        tokenizer = load_tokenizer(calibration.tokenizer or ctx.spec.model.path, ctx.spec.model.trust_remote_code)
        ctx.batches = calibration_batches(calibration, tokenizer)
    return ctx.batches


def fingerprint(ctx: PassContext, keys: list[str]) -> str:
    calibration = ctx.spec.calibration.model_dump() if ctx.spec.calibration else None
    text = json.dumps([ctx.spec.model.path, calibration, sorted(keys)], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_scores(path: Path, expected: str) -> dict | None:
    """Scores from an earlier run with the same model, data and sites (re-planning needs no forwards)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        if (f.metadata() or {}).get("fingerprint") != expected:
            return None
    return load_file(str(path))


@register_pass("calibrate", provides=("activations",))
def calibrate(ctx: PassContext) -> PassResult:
    """Gather activation scores with forward hooks (cached in the output's scores/activations.safetensors)."""
    sites = needed_sites(ctx)
    if not sites:
        return PassResult(summary={"sites": 0})
    keys = [s.key for s in sites]
    print_key = fingerprint(ctx, keys)
    previous = Path(ctx.spec.output) / SCORES_FILE if ctx.spec.output else None
    cached = cached_scores(previous, print_key) if previous else None
    if cached is not None and all(k in cached for k in keys):
        ctx.activations = {k: cached[k] for k in keys}
        source = "cache"
    else:
        batches = ensure_batches(ctx)
        total = sum(b.shape[0] for b in batches)
        with ctx.progress("calibrating", total) as bar:
            ctx.activations = collect_activations(ctx.analysis.model, sites, batches,
                                                  lambda n: bar.advance(bar.task_ids[0], n))
        source = f"{total} samples"
    if ctx.workdir is not None:
        (ctx.workdir / SCORES_FILE).parent.mkdir(exist_ok=True)
        save_file(ctx.activations, str(ctx.workdir / SCORES_FILE), metadata={"fingerprint": print_key})
    return PassResult(summary={"sites": len(sites), "source": source})
