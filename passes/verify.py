"""verify: reload the written checkpoint with transformers' own class and compare the logits."""

from __future__ import annotations

import torch

from graphprune.pipeline import PassContext, PassResult, PipelineError, register_pass
from graphprune.trace import example_inputs

from .materialize import GRAPH_FILE, TOLERANCE

@register_pass("verify", requires=("pruned_model",))
def verify(ctx: PassContext, tolerance: float | None = None) -> PassResult:
    """Logits of the reloaded checkpoint must match the in-memory pruned model."""
    from transformers import AutoModelForCausalLM

    if ctx.workdir is None:
        return PassResult(summary={"skipped": "nothing written"})
    model = ctx.pruned_model
    dtype = next(model.parameters()).dtype
    if ctx.analysis.family is None:
        reloaded = torch.export.load(ctx.workdir / GRAPH_FILE).module()
        ids = example_inputs(ctx.analysis.model)[0][0]  # seeded token ids within the vocabulary
        with torch.no_grad():
            expected, got = model(ids).float(), reloaded(ids).float()
        return _compare(expected, got, dtype, tolerance, ids)
    reloaded = AutoModelForCausalLM.from_pretrained(ctx.workdir, dtype=dtype).eval()
    ids = ctx.batches[0][:1] if ctx.batches else torch.randint(0, model.config.vocab_size, (1, 64),
                                                                 generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.float()
        got = reloaded(input_ids=ids, use_cache=False).logits.float()
    return _compare(expected, got, dtype, tolerance, ids)


def _compare(expected: torch.Tensor, got: torch.Tensor, dtype: torch.dtype, tolerance: float | None,
             ids: torch.Tensor) -> PassResult:
    difference = (expected - got).abs().max().item()
    limit = tolerance if tolerance is not None else TOLERANCE.get(dtype, 1e-4)
    if difference > limit:
        raise PipelineError(f"verify: reloaded checkpoint differs from the pruned model by {difference:.3g} "
                            f"(tolerance {limit})")
    return PassResult(summary={"max_abs_logit_diff": difference, "tokens": ids.numel()})
