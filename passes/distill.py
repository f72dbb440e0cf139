"""distill: recover the pruned model by knowledge distillation from the original (the `distill` section)."""

from __future__ import annotations

import json

from graphprune.data import load_tokenizer
from graphprune.distill import distill_in_process, training_samples
from graphprune.export.hf import write_hf_checkpoint
from graphprune.pipeline import PassContext, PassResult, PipelineError, register_pass


@register_pass("distill", requires=("pruned_model",), provides=("pruned_model",), sections=("distill",))
def distill(ctx: PassContext) -> PassResult:
    """Train the pruned model against the original, in this process; rewrite the written checkpoint."""
    spec = ctx.section("distill")
    if ctx.analysis.family is None:
        raise PipelineError("distill: needs a Hugging Face family model (the generic graph output is not trainable)")
    tokenizer = load_tokenizer(spec.tokenizer or ctx.spec.model.path)
    train, holdout = training_samples(spec, ctx.spec.calibration.data if ctx.spec.calibration else None, tokenizer)
    result = distill_in_process(ctx.analysis.model, ctx.pruned_model, train, holdout, spec, ctx.console,
                                scratch_in=ctx.workdir)
    ctx.pruned_model.eval()
    if ctx.workdir is not None:
        write_hf_checkpoint(ctx.pruned_model, ctx.workdir)
        (ctx.workdir / "distill.json").write_text(json.dumps({**result.summary(), "log": result.log}, indent=2) + "\n")
    ctx.report["distill"] = result.summary()
    return PassResult(changed=True, summary=result.summary())
