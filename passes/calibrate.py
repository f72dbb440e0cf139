"""calibrate: measure every data-driven score the plan needs (activation, taylor, removal), for the
groups the targets shrink only, and cache them in the output's scores/activations.safetensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from graphprune.data import calibration_batches, load_tokenizer
from graphprune.groups import Group
from graphprune.importance import (activation_sites, collect_activations, collect_removal, collect_taylor, mask_sites,
                                   method_for, scored_groups)
from graphprune.pipeline import PassContext, PassResult, register_pass
from graphprune.planning import BUDGET_KINDS, plan_sizes

# Not a top-level *.safetensors: runtimes (TensorRT-LLM, vLLM) load every such file as model weights.
SCORES_FILE = "scores/activations.safetensors"


def groups_by_method(ctx: PassContext, every_group: bool = False) -> dict[str, list[Group]]:
    """The shrunk groups (`every_group`: all of them), by the method that scores them."""
    by_method: dict[str, list[Group]] = {}
    sizes = plan_sizes(ctx.analysis, ctx.spec.targets).sizes
    # a group that may still shrink is marked as shrunk (size 0): every group for a search, the width axes a
    # params budget may spend (choose_split decides how) for apply
    may_shrink = [g for g in ctx.analysis.groups if every_group or
                  (ctx.spec.targets.params is not None and g.kind in BUDGET_KINDS)]
    sizes.update({g.name: 0 for g in may_shrink})
    for group in scored_groups(ctx.analysis, sizes):
        method = method_for(ctx.spec.importance, group)
        if method == "activation" or sizes[group.name] < group.size:  # only Algorithm 1 scores a kept axis too
            by_method.setdefault(method, []).append(group)
    return by_method


def ensure_batches(ctx: PassContext) -> list:
    if ctx.batches is None:
        calibration = ctx.spec.calibration
        tokenizer = load_tokenizer(calibration.tokenizer or ctx.spec.model.path, ctx.spec.model.trust_remote_code)
        ctx.batches = calibration_batches(calibration, tokenizer)
    return ctx.batches


def fingerprint(ctx: PassContext, keys: list[str]) -> str:
    """What the scores depend on, by content: the weights, the token ids (data, tokenizer, sampling) and
    every scoring setting. An edited data file or retrained model never reuses old scores."""
    digest = hashlib.sha256()
    settings = {"sites": sorted(keys), "importance": ctx.spec.importance.model_dump(),
                "calibration": ctx.spec.calibration.model_dump() if ctx.spec.calibration else None}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    with torch.no_grad():
        for name, tensor in ctx.analysis.model.state_dict().items():
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    for batch in ensure_batches(ctx):
        digest.update(batch.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def cached_scores(path: Path, expected: str) -> dict | None:
    """Scores from an earlier run with the same model, data and sites (re-planning needs no forwards).
    An unreadable (corrupt, truncated) cache is ignored and recomputed."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") != expected:
                return None
        return load_file(str(path))
    except Exception:  # noqa: BLE001 - any unreadable cache is just a cache miss
        return None


@register_pass("calibrate", provides=("activations",))
def calibrate(ctx: PassContext, every_group: bool = False) -> PassResult:
    """Activation scores (forward hooks), taylor (one backward per batch), removal (one forward per unit).

    Only the groups the targets shrink are scored; `every_group` scores all (a search, whose candidates
    may shrink any of them)."""
    by_method = groups_by_method(ctx, every_group)
    sites = [site for group in by_method.get("activation", []) for site in activation_sites(ctx.analysis, group)]
    taylor = {g.name: (g, mask_sites(ctx.analysis, g)) for g in by_method.get("taylor", [])}
    removal = {g.name: (g, mask_sites(ctx.analysis, g)) for g in by_method.get("removal", [])}
    keys = sorted({s.key for s in sites}) + [f"taylor/{n}" for n in taylor] + [f"removal/{n}" for n in removal]
    if not keys:
        return PassResult(summary={"sites": 0})
    print_key = fingerprint(ctx, keys)
    cached = cached_scores(Path(ctx.spec.output) / SCORES_FILE, print_key) if ctx.spec.output else None
    if cached is not None and all(k in cached for k in keys):
        scores, source = {k: cached[k] for k in keys}, "cache"
    else:
        scores, source = _measure(ctx, sites, taylor, removal), f"{sum(b.shape[0] for b in ensure_batches(ctx))} samples"
    ctx.activations = {k: v for k, v in scores.items() if "/" not in k}
    ctx.unit_scores = {k.split("/", 1)[1]: v for k, v in scores.items() if "/" in k}
    if ctx.workdir is not None:
        (ctx.workdir / SCORES_FILE).parent.mkdir(exist_ok=True)
        save_file(scores, str(ctx.workdir / SCORES_FILE), metadata={"fingerprint": print_key})
    return PassResult(summary={"sites": len(set(s.key for s in sites)), "taylor_groups": len(taylor),
                               "removal_groups": len(removal), "source": source})


def _measure(ctx: PassContext, sites: list, taylor: dict, removal: dict) -> dict[str, torch.Tensor]:
    batches = ensure_batches(ctx)
    total = sum(b.shape[0] for b in batches)
    model = ctx.analysis.model
    scores: dict[str, torch.Tensor] = {}
    if sites:
        with ctx.progress("calibrating (activations)", total) as bar:
            scores.update(collect_activations(model, sites, batches, lambda n: bar.advance(bar.task_ids[0], n)))
    if taylor:
        with ctx.progress("calibrating (taylor)", total) as bar:
            measured = collect_taylor(model, taylor, batches, lambda n: bar.advance(bar.task_ids[0], n))
        scores.update({f"taylor/{name}": value for name, value in measured.items()})
    if removal:
        samples = torch.cat(batches)[: ctx.spec.importance.removal_samples]
        few = list(samples.split(batches[0].shape[0]))
        layers = [model.get_submodule(layer.module) for layer in ctx.analysis.layers]
        steps = len(few) * sum(group.size for group, _ in removal.values())
        with ctx.progress("calibrating (removal)", steps) as bar:
            measured = collect_removal(model, layers, removal, few, lambda n: bar.advance(bar.task_ids[0], n))
        scores.update({f"removal/{name}": value for name, value in measured.items()})
    return {k: v.contiguous() for k, v in scores.items()}
