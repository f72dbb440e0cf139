"""materialize: build the pruned model of the same family and write it as a standard checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from graphprune.export.hf import copy_tokenizer, write_hf_checkpoint
from graphprune.pipeline import PassContext, PassResult, PipelineError, register_pass
from graphprune.trace import example_inputs
from graphprune.planning import pruned_config


@register_pass("materialize", requires=("plan", "state_dict"), provides=("pruned_model",))
def materialize(ctx: PassContext) -> PassResult:
    """The family's own class from the new config and sliced weights, saved with its tokenizer.

    Models without a family: the rewritten graph, saved with torch.export.save.
    """
    from transformers import AutoModelForCausalLM

    analysis = ctx.analysis
    if analysis.family is None:
        return _save_graph(ctx)
    config = pruned_config(analysis, ctx.plan.sizes, ctx.plan.dropped_layers)
    dtype = next(analysis.model.parameters()).dtype
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    missing, unexpected = model.load_state_dict(ctx.state_dict, strict=False)
    missing = [k for k in missing if k in dict(model.named_parameters())]
    if missing or unexpected:
        raise PipelineError(f"materialize: the pruned weights do not fit {type(model).__name__}: "
                            f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    ctx.pruned_model = model
    if ctx.workdir is not None:
        write_hf_checkpoint(model, ctx.workdir)
        # the model's tokenizer, else the calibration one, so that the output is self-contained
        calibration_tokenizer = ctx.spec.calibration.tokenizer if ctx.spec.calibration else None
        if not copy_tokenizer(Path(ctx.spec.model.path), ctx.workdir) and calibration_tokenizer:
            copy_tokenizer(Path(calibration_tokenizer), ctx.workdir)
    return PassResult(changed=True, summary={"params": sum(p.numel() for p in model.parameters()),
                                             "class": type(model).__name__})


GRAPH_FILE = "model.pt2"


def _save_graph(ctx: PassContext) -> PassResult:
    """A model without a family: the rewritten graph, re-exported (which proves it runs) and saved."""
    example = example_inputs(ctx.analysis.model)
    ids = example[0][0] if example[0] else example[1]["input_ids"]
    # The graph keeps the traced input shape (batch 1, the traced length): views in it are static.
    exported = torch.export.export(ctx.pruned_model, (ids,), strict=False)
    if ctx.workdir is not None:
        torch.export.save(exported, ctx.workdir / GRAPH_FILE)
    params = sum(p.numel() for p in ctx.pruned_model.parameters())
    return PassResult(changed=True, summary={"params": params, "class": "torch.export graph", "file": GRAPH_FILE})
