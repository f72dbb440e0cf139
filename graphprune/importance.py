"""Importance scores: where to measure comes from the analysis, eager forward hooks measure.

Activation scores follow Minitron: per channel, the mean of |activation| over the sequence, then
the L2 norm over the batch (accumulated over all calibration batches). A unit spanning several
channels (a head) scores the L2 norm of its channels' scores.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .api import Analysis
from .groups import Group, ParamSlice
from .slicing import unit_labels


@dataclass(frozen=True)
class ActivationSite:
    """Channels [start, stop) of the last dim of a module's output (or input)."""

    module: str
    use_input: bool
    piece: ParamSlice  # the group's slice whose layout labels those channels

    @property
    def key(self) -> str:
        return f"{self.module}:{'in' if self.use_input else 'out'}:{self.piece.start}-{self.piece.stop}"


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0]


def _in_layer(analysis: Analysis, module: str) -> bool:
    return any(module.startswith(layer.module + ".") for layer in analysis.layers)


def activation_sites(analysis: Analysis, group: Group) -> list[ActivationSite]:
    """Where to measure a group, per the paper: see the module docstring of each kind."""
    modules = dict(analysis.model.named_modules())
    params = [s for s in group.slices if not s.buffer]
    if group.kind == "hidden":  # every pre-norm output inside the layers
        return [ActivationSite(_module_of(s.param), False, s) for s in params
                if len(analysis.axis_graph.param_shapes[s.param]) == 1 and _in_layer(analysis, _module_of(s.param))
                and "norm" in type(modules[_module_of(s.param)]).__name__.lower()]
    if group.kind == "ffn":  # output of the first projection
        first = next((s for s in params if s.dim == 0 and isinstance(modules.get(_module_of(s.param)), nn.Linear)), None)
        return [ActivationSite(_module_of(first.param), False, first)] if first else []
    if group.kind in ("mamba_heads", "mamba_head_dim"):  # the x slice of in_proj: the rows feeding the conv
        return [ActivationSite(_module_of(s.param), False, s) for s in _mamba_x_slices(analysis, group)]
    if group.kind == "attention_heads":  # the input of the output projection, per head
        return [ActivationSite(_module_of(s.param), True, s) for s in params
                if s.dim == 1 and isinstance(modules.get(_module_of(s.param)), nn.Linear)]
    return []


def _mamba_x_slices(analysis: Analysis, group: Group) -> list[ParamSlice]:
    found = []
    by_param = {}
    for s in group.slices:
        by_param.setdefault((s.param, s.dim), []).append(s)
    for source in analysis.conv_sources:
        conv_slices = by_param.get((source.conv_weight, 0), [])
        linear_slices = by_param.get((source.linear_weight, 0), [])
        for conv_slice in conv_slices:
            found += [s for s in linear_slices if s.start == source.offset + conv_slice.start]
    return found


@torch.no_grad()
def collect_activations(model: nn.Module, sites: Iterable[ActivationSite], batches: list[torch.Tensor],
                        progress: Callable[[int], None] = lambda n: None) -> dict[str, torch.Tensor]:
    """Run the calibration batches once with hooks on every site; return per-channel scores."""
    sums: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    by_module: dict[tuple[str, bool], list[ActivationSite]] = {}
    for site in sites:
        by_module.setdefault((site.module, site.use_input), []).append(site)

    def hook_for(group: list[ActivationSite], use_input: bool):
        def hook(module, args, output):
            tensor = args[0] if use_input else (output[0] if isinstance(output, tuple) else output)
            values = tensor.detach().abs().float()
            per_sample = values.mean(dim=tuple(range(1, values.dim() - 1))) if values.dim() > 2 else values
            squared = per_sample.pow(2).sum(0)
            for site in group:
                part = squared[site.piece.start : site.piece.stop]
                sums[site.key] = sums[site.key] + part if site.key in sums else part.clone()
        return hook

    handles = [modules[name].register_forward_hook(hook_for(group, use_input))
               for (name, use_input), group in by_module.items()]
    try:
        for batch in batches:
            _forward(model, batch)
            progress(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return {key: value.sqrt() for key, value in sums.items()}


def _forward(model: nn.Module, ids: torch.Tensor):
    ids = ids.to(next(model.parameters()).device)
    if hasattr(model, "config") and hasattr(model, "generation_config"):
        return model(input_ids=ids, use_cache=False).logits
    return model(ids)


def unit_scores(group: Group, sites: list[ActivationSite], stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per unit: L2 over its channels, summed over sites (hidden: over every layer's pre-norm)."""
    total = torch.zeros(group.size)
    for site in sites:
        labels = unit_labels(site.piece, group.name, group.size)
        channel = stats[site.key]
        squared = torch.zeros(group.size).index_add_(0, labels[labels >= 0], channel[labels >= 0].pow(2))
        total += squared.sqrt()
    return total


def mamba_scores(heads: Group, head_dim: Group, sites: list[ActivationSite], stats: dict[str, torch.Tensor],
                 keep_channels: int, nested: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1: s[h, p] from the x slice; channels by L2 over heads; heads by L2 over kept channels."""
    s = torch.zeros(heads.size, head_dim.size)
    for site in sites:
        head_of = unit_labels(site.piece, heads.name, heads.size)
        channel_of = unit_labels(site.piece, head_dim.name, head_dim.size)
        s.index_put_((head_of, channel_of), stats[site.key], accumulate=True)
    channel_scores = s.norm(dim=0)
    kept = torch.topk(channel_scores, keep_channels).indices if nested else torch.arange(head_dim.size)
    head_scores = s[:, kept].norm(dim=1)
    return head_scores, channel_scores


@torch.no_grad()
def magnitude_scores(model: nn.Module, group: Group) -> torch.Tensor:
    """Per unit: L2 norm of every weight entry the unit owns."""
    tensors = dict(model.named_parameters())
    total = torch.zeros(group.size)
    for piece in group.slices:
        if piece.buffer:
            continue
        weight = tensors[piece.param].detach().float().narrow(piece.dim, piece.start, piece.stop - piece.start)
        per_index = weight.movedim(piece.dim, 0).reshape(piece.stop - piece.start, -1).pow(2).sum(1)
        labels = unit_labels(piece, group.name, group.size)
        total.index_add_(0, labels[labels >= 0], per_index[labels >= 0])
    return total.sqrt()


def random_scores(group: Group, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(random.Random(f"{seed}:{group.name}").randrange(2**31))
    return torch.rand(group.size, generator=generator)


@torch.no_grad()
def depth_scores(model: nn.Module, layers: list[nn.Module], batches: list[torch.Tensor], method: str,
                 progress: Callable[[int], None] = lambda n: None) -> torch.Tensor:
    """Per layer: KL(full || layer removed) of the next-token distributions, or 1 - cos(in, out)."""
    scores = torch.zeros(len(layers))
    if method == "cosine":
        def cosine_hook(index):
            def hook(module, args, kwargs, output):
                x = args[0] if args else kwargs["hidden_states"]
                y = output[0] if isinstance(output, tuple) else output
                scores[index] += (1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).mean().item()
            return hook
        handles = [layer.register_forward_hook(cosine_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        try:
            for batch in batches:
                _forward(model, batch)
                progress(1)
        finally:
            for h in handles:
                h.remove()
        return scores / max(len(batches), 1)
    for batch in batches:
        reference = F.log_softmax(_forward(model, batch).float(), dim=-1)
        for i, layer in enumerate(layers):
            handle = layer.register_forward_hook(_skip_layer, with_kwargs=True)
            try:
                removed = F.log_softmax(_forward(model, batch).float(), dim=-1)
            finally:
                handle.remove()
            kl = F.kl_div(removed.flatten(0, -2), reference.flatten(0, -2), log_target=True, reduction="batchmean")
            scores[i] += kl.item()
            progress(1)
    return scores / max(len(batches), 1)


def _skip_layer(module, args, kwargs, output):
    """Make a residual block the identity: its output is its input."""
    x = args[0] if args else kwargs["hidden_states"]
    return (x, *output[1:]) if isinstance(output, tuple) else x
