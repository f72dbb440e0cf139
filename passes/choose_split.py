"""choose_split: spend a parameter budget where the model loses least (with `targets.params`).

One common shrink factor for hidden, FFN and Mamba heads is a guess; which axis can give most is a
property of the model. This pass builds a few splits of the budget in memory from the calibrated
scores (the common-factor one among them), measures each one's LM loss on the last calibration
sequences, and hands the best to `plan` as explicit targets.
"""

from __future__ import annotations

import torch

from graphprune.distill import heldout_loss
from graphprune.pipeline import PassContext, PassResult, register_pass
from graphprune.planning import count_params, plan_sizes
from graphprune.search import budget_splits, build_in_memory
from graphprune.spec import TargetsSpec

from .calibrate import ensure_batches


@register_pass("choose_split", provides=("targets",), sections=("calibration",))
def choose_split(ctx: PassContext) -> PassResult:
    """Compare `importance.split_candidates` ways to spend targets.params by LM loss; plan the best."""
    targets, importance = ctx.spec.targets, ctx.spec.importance
    if targets.params is None:
        return PassResult(summary={"skipped": "no targets.params"})
    splits = budget_splits(ctx.analysis, targets, importance.split_candidates)
    if len(splits) > 1:
        batches = ensure_batches(ctx)
        samples = torch.cat(batches)[-importance.split_samples:]
        losses = []
        with ctx.progress("choosing the budget split", len(splits)) as bar:
            for split in splits:
                losses.append(heldout_loss(build_in_memory(ctx, split), samples, batches[0].shape[0]))
                bar.advance(bar.task_ids[0])
    else:
        losses = [None]
    best = min(range(len(splits)), key=lambda i: losses[i] if losses[i] is not None else 0.0)
    ctx.targets = TargetsSpec(**splits[best])
    rows = [{"targets": split, "params": count_params(ctx.analysis, plan_sizes(ctx.analysis, TargetsSpec(**split)).sizes),
             "loss": None if loss is None else round(loss, 5)} for split, loss in zip(splits, losses)]
    ctx.report["budget_split"] = {"candidates": rows, "chosen": splits[best], "common_factor": splits[0]}
    return PassResult(changed=best != 0, summary={"candidates": len(splits), "chosen": splits[best],
                                                  "loss": rows[best]["loss"], "common_factor_loss": rows[0]["loss"]})
