"""score_depth: rank layers for depth pruning (KL of logits with the layer removed, or cosine)."""

from __future__ import annotations

import torch

from graphprune.importance import depth_scores
from graphprune.pipeline import PassContext, PassResult, register_pass

from .calibrate import ensure_batches


@register_pass("score_depth", provides=("depth_scores",))
def score_depth(ctx: PassContext) -> PassResult:
    """Score every layer when the targets drop layers (skipped otherwise)."""
    if ctx.spec.targets.num_layers is None:
        return PassResult(summary={"skipped": "no num_layers target"})
    layers = [ctx.analysis.model.get_submodule(layer.module) for layer in ctx.analysis.layers]
    method = ctx.spec.importance.depth
    if method == "random":
        generator = torch.Generator().manual_seed(ctx.spec.calibration.seed if ctx.spec.calibration else 0)
        ctx.depth_scores = torch.rand(len(layers), generator=generator)
    else:
        batches = ensure_batches(ctx)
        samples = torch.cat(batches)[: ctx.spec.importance.depth_samples]
        depth_batches = list(samples.split(batches[0].shape[0]))
        steps = len(depth_batches) * (len(layers) if method == "kl_removal" else 1)
        with ctx.progress(f"depth ({method})", steps) as bar:
            ctx.depth_scores = depth_scores(ctx.analysis.model, layers, depth_batches, method,
                                            lambda n: bar.advance(bar.task_ids[0], n))
    return PassResult(summary={"method": method, "scores": [round(s, 6) for s in ctx.depth_scores.tolist()]})
