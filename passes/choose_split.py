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
    if len(splits) > 1:  # the first is the common factor, the only one when nothing else fits
        batches = ensure_batches(ctx)
        samples = torch.cat(batches)[-importance.split_samples:]
        with ctx.progress("choosing the budget split", len(splits)) as bar:
            for split in splits:
                split.zero_shot_loss = round(heldout_loss(build_in_memory(ctx, split.targets), samples,
                                                          batches[0].shape[0]), 5)
                bar.advance(bar.task_ids[0])
    best = min(splits, key=lambda split: split.zero_shot_loss or 0.0)
    ctx.targets = TargetsSpec(**best.targets)
    rows = [{"targets": s.targets, "params": s.params, "loss": s.zero_shot_loss} for s in splits]
    ctx.report["budget_split"] = {"candidates": rows, "chosen": best.targets, "common_factor": splits[0].targets}
    return PassResult(changed=best is not splits[0], summary={"candidates": len(splits), "chosen": best.targets,
                                                              "loss": best.zero_shot_loss,
                                                              "common_factor_loss": splits[0].zero_shot_loss})
