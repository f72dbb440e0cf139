"""reconstruct: refit the kept weights of every projection that reads a shrunk group (`reconstruct` section).

For a Linear that reads pruned units through its input columns (o_proj for heads, down_proj for FFN
neurons, a Mamba out_proj, every projection of the residual stream for the hidden size), the pruned
layer computes X_K W_K^T where the original computed X W^T.
The least-squares fit W'_K = W G[:, K] (G[K, K] + ridge)^-1 from the Gram matrix G = X^T X of the
original model's inputs (one forward pass over the calibration data) makes the pruned output as
close as it can be to the original's. Only existing weights change: the architecture stays standard.
"""

from __future__ import annotations

import torch
from torch import nn

from graphprune.importance import forward, reader_slices
from graphprune.pipeline import PassContext, PassResult, register_pass
from graphprune.rewrite import rewrite_graph
from graphprune.spec import ReconstructSpec

from .calibrate import ensure_batches
from .prune import graph_tensors, kept_indices


def consumers(ctx: PassContext) -> dict[str, list[int]]:
    """Linear weights that read a shrunk group in their input columns -> their kept input columns.

    For heads, FFN neurons and Mamba heads: o_proj, down_proj, out_proj. For the hidden size: every
    projection reading the residual stream (q/k/v, gate/up, in_proj, ...). A weight shared with
    another tensor (tied embeddings) is left alone: refitting it would change the other too.
    """
    model = ctx.analysis.model
    names_of: dict[int, int] = {}
    for _, tensor in model.named_parameters(remove_duplicate=False):
        names_of[id(tensor)] = names_of.get(id(tensor), 0) + 1
    modules = dict(model.named_modules())
    found: dict[str, list[int]] = {}
    for group in ctx.plan.shrunk(ctx.analysis):
        for piece in reader_slices(ctx.analysis, group):
            module = piece.param.rsplit(".", 1)[0]
            param = f"{module}.weight"
            source = ctx.analysis.slice_name(param)
            if param in found or source is None or names_of[id(modules[module].weight)] > 1:
                continue
            found[param] = kept_indices(ctx, source, 1)
    return found


@torch.no_grad()
def input_statistics(model: nn.Module, modules: list[str], norms: dict[str, torch.Tensor], batches: list[torch.Tensor],
                     progress) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One pass over the batches: X^T X (float64) of each module's input (modules that read the same tensor,
    q/k/v of one layer, share one matrix), and for each norm of the residual stream the mean over tokens of
    rms(x_kept) / rms(x): the factor by which normalising over the kept channels only inflates its output."""
    grams: dict[str, torch.Tensor] = {}
    owner_of: dict[str, str] = {}
    seen: dict[int, tuple[str, torch.Tensor]] = {}   # this forward's inputs, kept alive so ids stay unique
    ratio_sums: dict[str, float] = dict.fromkeys(norms, 0.0)
    tokens = 0
    named = dict(model.named_modules())

    def gram_hook(name):
        def accumulate(module, args):
            owner = seen.setdefault(id(args[0]), (name, args[0]))[0]
            owner_of[name] = owner
            if owner != name:
                return
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[name] = grams[name] + x.T @ x if name in grams else x.T @ x
        return accumulate

    def norm_hook(name):
        def accumulate(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            kept = x[:, norms[name].to(x.device)]
            ratio = (kept.pow(2).mean(-1) + 1e-12).sqrt() / (x.pow(2).mean(-1) + 1e-12).sqrt()
            ratio_sums[name] += ratio.sum().item()
        return accumulate

    handles = [named[name].register_forward_pre_hook(gram_hook(name)) for name in modules]
    handles += [named[name].register_forward_pre_hook(norm_hook(name)) for name in norms]
    try:
        for batch in batches:
            forward(model, batch)
            seen.clear()
            tokens += batch.numel()
            progress(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return {name: grams[owner_of[name]] for name in modules}, {n: v / max(tokens, 1) for n, v in ratio_sums.items()}


def gram_chunks(modules: list[str], in_features: dict[str, int], budget: int) -> list[list[str]]:
    """The modules packed, largest first, into chunks whose Gram matrices (float64, in_features^2 each,
    counted as if none were shared) fit `budget` bytes; a module larger than the budget is a chunk alone."""
    chunks: list[tuple[list[int], list[str]]] = []   # (bytes used, modules)
    for module in sorted(modules, key=lambda m: -in_features[m]):
        size = 8 * in_features[module] ** 2
        chunk = next((c for c in chunks if c[0][0] + size <= budget), None)
        if chunk is None:
            chunk = ([0], [])
            chunks.append(chunk)
        chunk[0][0] += size
        chunk[1].append(module)
    return [names for _, names in chunks]


def residual_norms(ctx: PassContext) -> dict[str, torch.Tensor]:
    """RMS/LayerNorm modules over the hidden size, when it shrinks -> the kept hidden channels."""
    hidden = next((g for g in ctx.plan.shrunk(ctx.analysis) if g.kind == "hidden"), None)
    if hidden is None:
        return {}
    modules = dict(ctx.analysis.model.named_modules())
    norms = {}
    for piece in hidden.slices:
        module = piece.param.rsplit(".", 1)[0]
        if (piece.buffer or piece.param.rsplit(".", 1)[1] != "weight" or len(ctx.analysis.axis_graph.param_shapes[piece.param]) != 1
                or "norm" not in type(modules.get(module)).__name__.lower()):
            continue
        norms[module] = torch.tensor(kept_indices(ctx, piece.param, 0), dtype=torch.long)
    return norms


def output_error(weight: torch.Tensor, kept: torch.Tensor, refit: torch.Tensor, gram: torch.Tensor) -> float:
    """||X_K refit^T - X W^T||^2 / ||X W^T||^2, from the Gram matrix alone."""
    target = torch.einsum("oi,ij,oj->", weight, gram, weight)
    cross = torch.einsum("ok,kj,oj->", refit, gram[kept], weight)
    fitted = torch.einsum("ok,kl,ol->", refit, gram[kept][:, kept], refit)
    return float((fitted - 2 * cross + target) / target.clamp_min(1e-30))


def refit(weight: torch.Tensor, kept: torch.Tensor, gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_V ||X_K V^T - X W^T||^2 + ridge * mean(diag G_KK) * ||V||^2."""
    gram_kept = gram[kept][:, kept]
    damping = ridge * gram_kept.diagonal().mean().clamp_min(1e-12)
    system = gram_kept + damping * torch.eye(len(kept), dtype=gram.dtype)
    right = weight @ gram[:, kept]                                   # [out, K]
    return torch.linalg.solve(system, right.T).T                     # system is symmetric


@register_pass("reconstruct", requires=("plan", "state_dict"), provides=("state_dict", "pruned_model"),
               sections=("calibration",))
def reconstruct(ctx: PassContext) -> PassResult:
    """Least-squares refit of the kept input columns of every reader of a pruned unit to the original outputs;
    for a shrunk hidden size, the residual-stream norms are rescaled first."""
    spec = ctx.spec.reconstruct or ReconstructSpec()  # listed explicitly in `passes`: the defaults
    found, norms = consumers(ctx), residual_norms(ctx)
    if not found and not norms:
        return PassResult(summary={"layers": 0})
    model = ctx.analysis.model
    batches = ensure_batches(ctx)
    samples = torch.cat(batches)[: spec.samples] if spec.samples else torch.cat(batches)
    few = list(samples.split(batches[0].shape[0]))
    weights = dict(model.named_parameters())
    param_of = {name.rsplit(".", 1)[0]: name for name in found}
    # one forward pass per chunk, its Grams freed after (norms alone: one pass with no Gram)
    chunks = gram_chunks(list(param_of), {m: weights[p].shape[1] for m, p in param_of.items()},
                         spec.max_gram_bytes) or [[]]
    errors, scales = {}, {}
    with ctx.progress("reconstructing (input statistics)", len(samples) * len(chunks)) as bar:
        for index, chunk in enumerate(chunks):
            grams, measured = input_statistics(model, chunk, norms if index == 0 else {}, few,
                                               lambda n: bar.advance(bar.task_ids[0], n))
            scales.update(measured)
            for module in chunk:
                errors[module] = _refit_into(ctx, param_of[module], found[param_of[module]], weights, grams.pop(module),
                                             spec.ridge)
    for norm, scale in scales.items():  # a norm over fewer channels divides by their smaller RMS: undo it on average
        name = f"{norm}.weight"
        ctx.state_dict[name] = (ctx.state_dict[name].double() * scale).to(ctx.state_dict[name].dtype).contiguous()
    if ctx.analysis.family is None:  # the generic pruned model is the rewritten graph: rebuild it with the refit
        ctx.pruned_model = rewrite_graph(ctx.analysis, ctx.plan, graph_tensors(ctx, ctx.state_dict))
    ctx.report["reconstruct"] = errors
    mean = {k: round(sum(e[k] for e in errors.values()) / max(len(errors), 1), 6) for k in ("before", "after")}
    return PassResult(changed=True, summary={"layers": len(errors), "relative_error_mean": mean, "samples": len(samples),
                                             "norms_rescaled": len(scales), "passes_over_samples": len(chunks)})


def _refit_into(ctx: PassContext, param: str, kept_list: list[int], weights: dict[str, torch.Tensor],
                gram: torch.Tensor, ridge: float) -> dict[str, float]:
    """Refit one reader into ctx.state_dict (only if that lowers its output error); its errors before/after."""
    weight = weights[param].detach().double().cpu()
    kept = torch.tensor(kept_list, dtype=torch.long)
    gram = gram.cpu()
    before = output_error(weight, kept, weight[:, kept], gram)
    fitted = refit(weight, kept, gram, ridge)
    after = output_error(weight, kept, fitted, gram)
    if after < before:  # never make the error it minimises worse
        source = ctx.analysis.slice_name(param)
        rows = (kept_indices(ctx, source, 0) if 0 in ctx.analysis.structure.param_slices[source]
                else list(range(weight.shape[0])))
        fitted = fitted.index_select(0, torch.tensor(rows, dtype=torch.long))
        ctx.state_dict[param] = fitted.to(weights[param].dtype).contiguous()
    return {"before": round(before, 6), "after": round(min(after, before), 6)}
