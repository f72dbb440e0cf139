"""plan: targets + scores -> kept units per group and layers to drop, honouring every constraint."""

from __future__ import annotations

import torch

from graphprune.groups import Group
from graphprune.importance import (activation_sites, magnitude_scores, mamba_scores, method_for, random_scores,
                                   unit_scores)
from graphprune.pipeline import PassContext, PassResult, PipelineError, register_pass
from graphprune.planning import choose_units, count_params, drop_lowest, plan_sizes

def _scores(ctx: PassContext, group: Group) -> torch.Tensor:
    scores = _raw_scores(ctx, group)
    if not torch.isfinite(scores).all():  # a NaN would rank arbitrarily: never plan on it
        raise PipelineError(f"plan: the {method_for(ctx.spec.importance, group)} scores of {group.name} are not finite "
                            "(NaN or infinite activations on the calibration data)")
    return scores


def _raw_scores(ctx: PassContext, group: Group) -> torch.Tensor:
    method = method_for(ctx.spec.importance, group)
    if method == "magnitude":
        return magnitude_scores(ctx.analysis.model, group)
    if method == "random":
        return random_scores(group, ctx.spec.calibration.seed if ctx.spec.calibration else 0)
    if method in ("taylor", "removal"):
        if group.name not in ctx.unit_scores:
            raise PipelineError(f"plan: {group.name} is scored by {method}, but no calibrate pass ran before plan")
        return ctx.unit_scores[group.name]
    if not ctx.activations:
        raise PipelineError(f"plan: {group.name} is scored by activations, but no calibrate pass ran before plan")
    return unit_scores(group, activation_sites(ctx.analysis, group), ctx.activations)


def _head_dim_of(ctx: PassContext, heads: Group) -> Group:
    return next(g for g in ctx.analysis.groups if g.kind == "mamba_head_dim" and g.layer == heads.layer)


def _choose_mamba(ctx: PassContext, heads: Group, kept: dict[str, list[int]], summaries: dict) -> None:
    """Algorithm 1 for one Mamba layer: head_dim channels first, then heads ranked on kept channels."""
    sizes = ctx.plan.sizes
    head_dim = _head_dim_of(ctx, heads)
    if method_for(ctx.spec.importance, heads) == "activation":
        head_scores, channel_scores = mamba_scores(heads, head_dim, activation_sites(ctx.analysis, heads),
                                                   ctx.activations, sizes[head_dim.name], ctx.spec.importance.mamba_nested)
    else:  # only the shrunk axes are scored
        head_scores = _scores(ctx, heads) if sizes[heads.name] < heads.size else None
        channel_scores = _scores(ctx, head_dim) if sizes[head_dim.name] < head_dim.size else None
    for group, scores in ((head_dim, channel_scores), (heads, head_scores)):
        if sizes[group.name] < group.size:
            kept[group.name] = choose_units(group, scores, sizes[group.name], ctx.spec.importance.group_aware)
            summaries[group.name] = _summary(scores, kept[group.name])


def _summary(scores: torch.Tensor, kept: list[int]) -> dict:
    mask = torch.zeros(len(scores), dtype=torch.bool)
    mask[kept] = True
    pruned = scores[~mask]
    return {"kept": kept, "score_kept_min": round(scores[mask].min().item(), 6),
            "score_pruned_max": round(pruned.max().item(), 6) if len(pruned) else None}


@register_pass("plan", provides=("plan",))
def plan(ctx: PassContext) -> PassResult:
    """Sizes from the targets; with weights, the kept units from the scores."""
    analysis = ctx.analysis
    ctx.plan = plan_sizes(analysis, ctx.targets or ctx.spec.targets)
    summaries: dict[str, dict] = {}
    if not ctx.dry_run:
        kept: dict[str, list[int]] = {}
        for group in ctx.plan.shrunk(analysis):
            if group.name in kept:
                continue
            if group.kind in ("mamba_heads", "mamba_head_dim"):
                heads = group if group.kind == "mamba_heads" else next(
                    g for g in analysis.groups if g.kind == "mamba_heads" and g.layer == group.layer)
                _choose_mamba(ctx, heads, kept, summaries)
                continue
            scores = _scores(ctx, group)
            kept[group.name] = choose_units(group, scores, ctx.plan.sizes[group.name])
            summaries[group.name] = _summary(scores, kept[group.name])
        ctx.plan.kept = kept
        if ctx.plan.sizes.get("layers", 0) < len(analysis.layers):
            if ctx.depth_scores is None:
                raise PipelineError("plan: num_layers needs depth scores; put score_depth before plan")
            ctx.plan.dropped_layers = drop_lowest(ctx.depth_scores, ctx.plan.sizes["layers"])
    ctx.report["groups"] = {g.name: {"kind": g.kind, "size": g.size, "kept_size": ctx.plan.sizes[g.name],
                                     **summaries.get(g.name, {})} for g in analysis.groups}
    ctx.report["dropped_layers"] = ctx.plan.dropped_layers
    after = count_params(analysis, ctx.plan.sizes, ctx.plan.dropped_layers)
    return PassResult(changed=bool(ctx.plan.shrunk(analysis)) or bool(ctx.plan.dropped_layers),
                      summary={"params_before": analysis.params, "params_after": after})
