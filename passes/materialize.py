"""materialize: build the pruned model of the same family and write it as a standard checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from graphprune.export.hf import copy_tokenizer, write_hf_checkpoint
from graphprune.pipeline import PassContext, PassResult, PipelineError, register_pass
from graphprune.trace import every_dim_dynamic, example_inputs, input_shapes, symbolic_dims
from graphprune.planning import pruned_config
from graphprune.rewrite import rewrite_graph

from .prune import graph_tensors


@register_pass("materialize", requires=("plan", "state_dict"), provides=("pruned_model",))
def materialize(ctx: PassContext) -> PassResult:
    """The family's own class from the new config and sliced weights, saved with its tokenizer.

    Models without a family: the rewritten graph, saved with torch.export.save.
    """
    analysis = ctx.analysis
    if analysis.family is None:
        return _save_graph(ctx)
    config = pruned_config(analysis, ctx.plan.sizes, ctx.plan.dropped_layers)
    dtype = next(analysis.model.parameters()).dtype
    model = type(analysis.model)._from_config(config, dtype=dtype).eval()  # the model's own class
    missing, unexpected = model.load_state_dict(ctx.state_dict, strict=False)
    missing = [k for k in missing if k in dict(model.named_parameters())]
    if missing or unexpected:
        raise PipelineError(f"materialize: the pruned weights do not fit {type(model).__name__}: "
                            f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    ctx.pruned_model = model
    checked = {} if ctx.plan.dropped_layers else {"sliced_graph_max_dlogit": _check_against_the_sliced_graph(ctx, model)}
    if ctx.workdir is not None:
        write_hf_checkpoint(model, ctx.workdir)
        # the model's tokenizer, else the calibration one, so that the output is self-contained
        calibration_tokenizer = ctx.spec.calibration.tokenizer if ctx.spec.calibration else None
        if not copy_tokenizer(Path(ctx.spec.model.path), ctx.workdir) and calibration_tokenizer:
            copy_tokenizer(Path(calibration_tokenizer), ctx.workdir)
    return PassResult(changed=True, summary={"params": sum(p.numel() for p in model.parameters()),
                                             "class": type(model).__name__, **checked})


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}  # max |dlogit| per dtype (verify too)


def _check_against_the_sliced_graph(ctx: PassContext, model: torch.nn.Module) -> float:
    """The model built from the pruned config with the sliced weights must compute what the original's
    traced graph computes when cut the same way: a config is proven on shapes only, and a class may
    derive a value from it that no slice carries (e.g. Gemma's embedding scale sqrt(hidden_size)).
    Returns the max |dlogit| (on the traced input). Layers dropped: not checked (the graph keeps them)."""
    graph = rewrite_graph(ctx.analysis, ctx.plan, graph_tensors(ctx, ctx.state_dict))
    args, kwargs = example_inputs(ctx.analysis.model)
    device = next(model.parameters()).device
    with torch.no_grad():
        expected = _logits(graph(*args, **kwargs)).float().to(device)
        got = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}).logits.float()
    difference = (expected - got).abs().max().item()
    limit = TOLERANCE.get(next(model.parameters()).dtype, 1e-4)
    if not difference <= limit:
        raise PipelineError(
            f"materialize: {type(model).__name__} built from the pruned config computes differently from the "
            f"sliced original (max |dlogit| {difference:.3g} > {limit}): its class derives something from the "
            f"config that the slices do not carry (e.g. a scale from hidden_size); leave that axis unpruned "
            f"({', '.join(dict.fromkeys(g.kind for g in ctx.plan.shrunk(ctx.analysis)))} shrink here) or write "
            f"a family module")
    return difference


def _logits(output) -> torch.Tensor:
    """The logits of an exported Hugging Face module's output (a ModelOutput, a tuple or a tensor)."""
    if hasattr(output, "logits"):
        return output.logits
    return output[0] if isinstance(output, (tuple, list)) else output


GRAPH_FILE = "model.pt2"


def _save_graph(ctx: PassContext) -> PassResult:
    """A model without a family: the rewritten graph, re-exported (which proves it runs) and saved.

    The analysis traced it with a symbolic batch and sequence (`trace.trace`) and the rewrite changed only
    channel sizes, so it is re-exported the same way: model.pt2 takes any batch size and sequence length
    (as far as the model's own code allows; `inputs` in the summary shows what stayed dynamic).
    """
    traced = ctx.analysis.exported
    dynamic = symbolic_dims(traced)
    example = getattr(traced, "example_inputs", None) or example_inputs(ctx.analysis.model, batch=2 if dynamic else 1)
    args, kwargs = example
    shapes = every_dim_dynamic(ctx.pruned_model, args, kwargs) if dynamic else None
    with torch.no_grad():
        exported = torch.export.export(ctx.pruned_model, args, kwargs, dynamic_shapes=shapes, strict=False)
    lost = {name: dims for name, dims in dynamic.items() if symbolic_dims(exported).get(name) != dims}
    if lost:
        raise PipelineError(f"materialize: the rewritten graph lost symbolic input sizes {lost}: a rewrite rule "
                            "made a batch or sequence size constant")
    if ctx.workdir is not None:
        torch.export.save(exported, ctx.workdir / GRAPH_FILE)
    params = sum(p.numel() for p in ctx.pruned_model.parameters())
    return PassResult(changed=True, summary={"params": params, "class": "torch.export graph", "file": GRAPH_FILE,
                                             "inputs": input_shapes(exported)})
