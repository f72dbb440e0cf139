"""prune: slice every parameter along every dimension a shrunk group owns."""

from __future__ import annotations

import torch

from graphprune.pipeline import PassContext, PassResult, register_pass
from graphprune.rewrite import rewrite_graph
from graphprune.slicing import slice_indices


def kept_indices(ctx: PassContext, name: str, dim: int) -> list[int]:
    sizes = {g.name: g.size for g in ctx.analysis.groups}
    pieces = ctx.analysis.structure.param_slices[name][dim]
    return [i for piece in pieces for i in slice_indices(piece, ctx.plan.kept, sizes)]


@register_pass("prune", requires=("plan",), provides=("state_dict", "pruned_model"))
def prune(ctx: PassContext) -> PassResult:
    """The pruned weights under their original names; for models without a family, the rewritten graph."""
    state, changed = sliced_state(ctx)
    ctx.state_dict = state
    if ctx.analysis.family is None:  # no checkpoint format: the rewritten graph is the pruned model
        ctx.pruned_model = rewrite_graph(ctx.analysis, ctx.plan, graph_tensors(ctx, state))
    return PassResult(changed=changed > 0, summary={"sliced_dims": changed})


def sliced_state(ctx: PassContext, tensors: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], int]:
    """Every tensor of the state dict (or of `tensors`) cut to the plan's kept units, and how many
    dimensions were cut."""
    analysis = ctx.analysis
    slices = analysis.structure.param_slices
    state: dict[str, torch.Tensor] = {}
    changed = 0
    with torch.no_grad():
        for name, tensor in (analysis.model.state_dict() if tensors is None else tensors).items():
            source = analysis.slice_name(name)
            for dim in sorted(slices.get(source, {})):
                index = torch.tensor(kept_indices(ctx, source, dim), dtype=torch.long)
                if len(index) != tensor.shape[dim] or not torch.equal(index, torch.arange(tensor.shape[dim])):
                    tensor = tensor.index_select(dim, index)
                    changed += 1
            state[name] = tensor.contiguous()
    return state, changed


def graph_tensors(ctx: PassContext, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` plus the non-persistent buffers (not in a state dict, but the graph reads them: a
    channel-sized one, such as Falcon-H1's mup vector, must be cut too)."""
    persistent = set(ctx.analysis.model.state_dict())
    others = {n: b for n, b in ctx.analysis.model.named_buffers() if n not in persistent}
    return state | sliced_state(ctx, others)[0]
