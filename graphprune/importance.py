"""Importance scores: where to measure comes from the analysis, eager forward hooks measure.

Activation scores follow Minitron: per channel, the mean of |activation| over the sequence, then
the L2 norm over the batch (accumulated over all calibration batches). A unit spanning several
channels (a head) scores the L2 norm of its channels' scores.

Two scores measure what removing a unit costs instead of how large it is, at its *mask site*: the
input of the projection that reads the unit (o_proj, down_proj, a Mamba out_proj), where zeroing
the unit's channels removes it exactly (for the hidden size: every pre-norm output).
- `taylor`: the derivative of each calibration sequence's LM loss with respect to a mask on the
  unit, sum over the unit's channels and tokens of activation x gradient; squared and summed over
  sequences (the Fisher information of the mask, a second-order estimate of the loss increase).
- `removal`: the KL divergence of the next-token distributions with the unit masked, per unit
  (one forward per unit from its layer on, on a few sequences): the quantity the depth score uses.
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


SPEC_FIELD_OF_KIND = {"hidden": "hidden", "ffn": "ffn", "mamba_heads": "mamba", "mamba_head_dim": "mamba",
                      "attention_heads": "attention"}
"""Which `importance` field of the spec scores a group kind (other kinds: magnitude)."""


def method_for(importance, group: Group) -> str:
    field = SPEC_FIELD_OF_KIND.get(group.kind)
    return getattr(importance, field) if field else "magnitude"


def scored_groups(analysis: Analysis, sizes: dict[str, int]) -> list[Group]:
    """The groups a plan with these sizes shrinks; a Mamba layer's heads and head_dim go together
    (Algorithm 1 chooses channels and heads from one score matrix)."""
    shrunk = {g.name for g in analysis.groups if g.kind != "layer" and sizes[g.name] < g.size}
    layers = {g.layer for g in analysis.groups if g.name in shrunk and g.kind.startswith("mamba")}
    return [g for g in analysis.groups if g.name in shrunk or (g.kind.startswith("mamba") and g.layer in layers)]


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


def mask_sites(analysis: Analysis, group: Group) -> list[ActivationSite]:
    """Where zeroing a unit's channels removes the unit: the input of each projection that reads the
    group (dim 1 of a Linear weight); for the hidden size, every pre-norm output inside the layers."""
    if group.kind == "hidden":
        return activation_sites(analysis, group)
    return [ActivationSite(_module_of(s.param), True, s) for s in reader_slices(analysis, group)]


def reader_slices(analysis: Analysis, group: Group) -> list[ParamSlice]:
    """The group's input columns of Linear weights: the projections that read its units."""
    modules = dict(analysis.model.named_modules())
    return [s for s in group.slices
            if not s.buffer and s.dim == 1 and isinstance(modules.get(_module_of(s.param)), nn.Linear)]


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
            tensor = _site_tensor(use_input, args, output)
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
            forward(model, batch)
            progress(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return {key: value.sqrt() for key, value in sums.items()}


def _site_tensor(use_input: bool, args: tuple, output) -> torch.Tensor:
    return args[0] if use_input else (output[0] if isinstance(output, tuple) else output)


def input_embeddings(model: nn.Module) -> nn.Module:
    """The token embedding of a Hugging Face model, or the first nn.Embedding of any module."""
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings()
    return next(m for m in model.modules() if isinstance(m, nn.Embedding))


def collect_taylor(model: nn.Module, groups: dict[str, tuple[Group, list[ActivationSite]]], batches: list[torch.Tensor],
                   progress: Callable[[int], None] = lambda n: None) -> dict[str, torch.Tensor]:
    """Per group, per unit: sum over sequences of (d loss_sequence / d mask_unit)^2, where the mask
    multiplies the unit's channels at every one of its mask sites (see the module docstring).

    Only activations get gradients (weights are frozen for the pass), so a batch costs about two forwards.
    """
    captured: dict[tuple[str, bool], torch.Tensor] = {}
    modules = dict(model.named_modules())
    wanted = {(site.module, site.use_input) for _, sites in groups.values() for site in sites}

    def capture(key):
        def hook(module, args, output):
            captured[key] = _site_tensor(key[1], args, output)
        return hook

    def start_graph(module, args, output):  # gradients start at the embeddings, not at the frozen weights
        return output.detach().requires_grad_(True)

    handles = [modules[name].register_forward_hook(capture((name, use_input))) for name, use_input in wanted]
    handles.append(input_embeddings(model).register_forward_hook(start_graph))
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    totals = {name: torch.zeros(group.size) for name, (group, _) in groups.items()}
    try:
        for batch in batches:
            captured.clear()
            with torch.enable_grad():
                logits = forward(model, batch).float()
                ids = batch.to(logits.device)
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
                keys = list(captured)
                grads = dict(zip(keys, torch.autograd.grad(loss, [captured[k] for k in keys])))
            # per sequence and channel: sum over tokens of activation x gradient
            per_channel = {k: (captured[k].detach().float() * grads[k].float()).flatten(1, -2).sum(1) for k in keys}
            for name, (group, sites) in groups.items():
                mask_gradient = torch.zeros(batch.shape[0], group.size)
                for site in sites:
                    labels = unit_labels(site.piece, group.name, group.size)
                    values = per_channel[(site.module, site.use_input)][:, site.piece.start:site.piece.stop].cpu()
                    mask_gradient.index_add_(1, labels[labels >= 0], values[:, labels >= 0])
                totals[name] += mask_gradient.pow(2).sum(0)
            progress(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
        for p in frozen:
            p.requires_grad_(True)
    return totals


@torch.no_grad()
def collect_removal(model: nn.Module, layers: list[nn.Module], groups: dict[str, tuple[Group, list[ActivationSite]]],
                    batches: list[torch.Tensor], progress: Callable[[int], None] = lambda n: None) -> dict[str, torch.Tensor]:
    """Per group, per unit: KL(full || unit masked) of the next-token distributions, mean per token.

    The layers before the unit's are not recomputed: their cached outputs are replayed.
    """
    modules = dict(model.named_modules())
    layer_of = {id(layer): i for i, layer in enumerate(layers)}
    totals = {name: torch.zeros(group.size) for name, (group, _) in groups.items()}
    for batch in batches:
        reference, outputs = _reference_with_layer_outputs(model, layers, batch)
        for name, (group, sites) in groups.items():
            first = min((_layer_index(modules, layer_of, site.module) for site in sites), default=0)
            with _replayed(layers[:first], outputs[:first]):
                for unit in range(group.size):
                    with _masked(modules, sites, group, unit):
                        masked = F.log_softmax(forward(model, batch).float(), dim=-1).flatten(0, -2)
                    totals[name][unit] += F.kl_div(masked, reference, log_target=True, reduction="batchmean").item()
                    progress(1)
    return {name: total / max(len(batches), 1) for name, total in totals.items()}


def _layer_index(modules: dict[str, nn.Module], layer_of: dict[int, int], module: str) -> int:
    """The index of the residual block holding `module` (0 when it is outside every block)."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        index = layer_of.get(id(modules.get(".".join(parts[:end]))))
        if index is not None:
            return index
    return 0


class _replayed:
    """Layers return their cached outputs instead of computing them (the input cannot have changed)."""

    def __init__(self, layers: list[nn.Module], outputs: list):
        self.layers, self.outputs = layers, outputs

    def __enter__(self):
        for layer, output in zip(self.layers, self.outputs):
            layer.forward = lambda *args, _output=output, **kwargs: _output
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward


class _masked:
    """Zero one unit's channels at every mask site of its group."""

    def __init__(self, modules: dict[str, nn.Module], sites: list[ActivationSite], group: Group, unit: int):
        self.handles, self.modules, self.sites, self.group, self.unit = [], modules, sites, group, unit

    def __enter__(self):
        for site in self.sites:
            labels = unit_labels(site.piece, self.group.name, self.group.size)
            channels = (site.piece.start + torch.nonzero(labels == self.unit).flatten()).tolist()
            if not channels:
                continue

            def zero(tensor, channels=channels):
                tensor = tensor.clone()
                tensor[..., channels] = 0
                return tensor

            module = self.modules[site.module]
            if site.use_input:
                self.handles.append(module.register_forward_pre_hook(
                    lambda m, args, zero=zero: (zero(args[0]), *args[1:])))
            else:
                self.handles.append(module.register_forward_hook(
                    lambda m, args, output, zero=zero: (zero(output[0]), *output[1:]) if isinstance(output, tuple)
                    else zero(output)))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def forward(model: nn.Module, ids: torch.Tensor):
    """Logits of a Hugging Face causal LM (no cache) or any module that maps token ids to logits."""
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
                forward(model, batch)
                progress(1)
        finally:
            for h in handles:
                h.remove()
        return scores / max(len(batches), 1)
    for batch in batches:
        reference, outputs = _reference_with_layer_outputs(model, layers, batch)
        for i, layer in enumerate(layers):
            handle = layer.register_forward_hook(_skip_layer, with_kwargs=True)
            try:
                with _replayed(layers[:i], outputs[:i]):  # the layers before i are unchanged: replay them
                    removed = F.log_softmax(forward(model, batch).float(), dim=-1).flatten(0, -2)
            finally:
                handle.remove()
            scores[i] += F.kl_div(removed, reference, log_target=True, reduction="batchmean").item()
            progress(1)
    return scores / max(len(batches), 1)


def _reference_with_layer_outputs(model: nn.Module, layers: list[nn.Module], batch: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Log-probabilities [tokens, vocab] of the unchanged model, and every layer's output on the way."""
    outputs: list = [None] * len(layers)
    handles = [layer.register_forward_hook(lambda m, a, output, i=i: outputs.__setitem__(i, output))
               for i, layer in enumerate(layers)]
    try:
        reference = F.log_softmax(forward(model, batch).float(), dim=-1).flatten(0, -2)
    finally:
        for handle in handles:
            handle.remove()
    return reference, outputs


def _skip_layer(module, args, kwargs, output):
    """Make a residual block the identity: its output is its input."""
    x = args[0] if args else kwargs["hidden_states"]
    return (x, *output[1:]) if isinstance(output, tuple) else x
