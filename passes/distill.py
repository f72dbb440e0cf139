"""distill: recover the pruned model by knowledge distillation from the original (the `distill` section)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from graphprune.data import load_tokenizer
from graphprune.distill import distill as run, progress_printer, total_steps, training_samples, World
from graphprune.export.hf import write_hf_checkpoint
from graphprune.pipeline import PassContext, PassResult, PipelineError, register_pass


@register_pass("distill", requires=("pruned_model",), provides=("pruned_model",))
def distill(ctx: PassContext) -> PassResult:
    """Train the pruned model against the original, in this process; rewrite the written checkpoint."""
    spec = ctx.spec.distill
    if spec is None:
        raise PipelineError("distill: the spec has no 'distill' section")
    if ctx.analysis.family is None:
        raise PipelineError("distill: needs a Hugging Face family model (the generic graph output is not trainable)")
    tokenizer = load_tokenizer(spec.tokenizer or ctx.spec.model.path)
    train, holdout = training_samples(spec, ctx.spec.calibration.data if ctx.spec.calibration else None, tokenizer)
    workdir = Path(tempfile.mkdtemp(prefix="graphprune-distill-"))
    bar, update = progress_printer(total_steps(spec, 1), ctx.console, World())
    try:
        with bar:
            result = run(ctx.analysis.model, ctx.pruned_model, train, holdout, spec, workdir, progress=update)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ctx.pruned_model.eval()
    if ctx.workdir is not None:
        write_hf_checkpoint(ctx.pruned_model, ctx.workdir)
        (ctx.workdir / "distill.json").write_text(json.dumps({**result.summary(), "log": result.log}, indent=2) + "\n")
    ctx.report["distill"] = result.summary()
    return PassResult(changed=True, summary=result.summary())
