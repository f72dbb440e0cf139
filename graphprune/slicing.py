"""Turn per-group unit choices into parameter indices, from the groups' slice layouts alone.

A choice for a group is a list of unit indices: kept units (pruning), or a permutation of all of
them (reordering). For a balanced group (Mamba heads over B/C groups, query heads over KV heads)
indices are global, `outer * units_per_group + local`, and each outer group keeps its own units:
the layout's preceding fixed factors tell which outer group a position belongs to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .groups import Group, LayoutConcat, LayoutFactor, ParamSlice

Choices = Mapping[str, Sequence[int]]


def slice_indices(piece: ParamSlice, choices: Choices, sizes: Mapping[str, int]) -> list[int]:
    """Indices along `piece.dim` that the choices keep, in order (absolute, offset included).

    `choices` maps group names to unit indices; `sizes` gives those groups' sizes (a group larger
    than its layout factor is balanced over the factors before it).
    """
    return [piece.start + i for i in _product_indices(piece.layout, choices, sizes)]


def _product_indices(layout: Sequence[LayoutFactor | LayoutConcat], choices: Choices, sizes: Mapping[str, int]) -> list[int]:
    # each partial product: (flat index within the layout so far, number of positions so far)
    combos: list[tuple[int, int]] = [(0, 1)]
    for factor in layout:
        size = _layout_size(factor)
        combos = [
            (flat * size + i, positions * size)
            for flat, positions in combos
            for i in _factor_indices(factor, choices, sizes, flat, positions)
        ]
    return [flat for flat, _ in combos]


def _factor_indices(
    factor: LayoutFactor | LayoutConcat, choices: Choices, sizes: Mapping[str, int], outer: int, outer_positions: int
) -> list[int]:
    if isinstance(factor, LayoutConcat):
        indices, offset = [], 0
        for part in factor.parts:
            indices.extend(offset + i for i in _product_indices(part, choices, sizes))
            offset += math.prod(_layout_size(f) for f in part)
        return indices
    chosen = choices.get(factor.name)
    if chosen is None:
        return list(range(factor.size))
    groups = sizes[factor.name] // factor.size
    if groups == 1:
        return list(chosen)
    if outer_positions % groups or len(chosen) % groups:
        raise ValueError(f"{factor.name}: {len(chosen)} units balanced over {groups} groups, "
                         f"with {outer_positions} positions before it")
    # Position decides the group: the k-th block of len(chosen)/groups units fills group k. A unit
    # taken from another group (the naive, group-unaware baseline) keeps its own channels there.
    group = outer // (outer_positions // groups)
    per_group = len(chosen) // groups
    return [i - group * factor.size for i in chosen[group * per_group:(group + 1) * per_group]]


def _layout_size(factor: LayoutFactor | LayoutConcat) -> int:
    if isinstance(factor, LayoutConcat):
        return sum(math.prod(_layout_size(f) for f in part) for part in factor.parts)
    return factor.size


def unit_labels(piece: ParamSlice, name: str, group_size: int) -> torch.Tensor:
    """For each index of the slice, in order, the unit of group `name` it belongs to (-1: none)."""
    return torch.tensor(_labels(piece.layout, name, group_size), dtype=torch.long)


def _labels(layout: Sequence[LayoutFactor | LayoutConcat], name: str, group_size: int) -> list[int]:
    combos: list[tuple[int, int, int]] = [(0, 1, -1)]  # (flat index so far, positions so far, label)
    for factor in layout:
        size = _layout_size(factor)
        out = []
        for flat, positions, label in combos:
            for i, inner_label in enumerate(_factor_labels(factor, name, group_size, flat, positions)):
                out.append((flat * size + i, positions * size, inner_label if inner_label >= 0 else label))
        combos = out
    return [label for _, _, label in combos]


def _factor_labels(factor: LayoutFactor | LayoutConcat, name: str, group_size: int, outer: int, positions: int) -> list[int]:
    if isinstance(factor, LayoutConcat):
        return [label for part in factor.parts for label in _labels(part, name, group_size)]
    if factor.name != name:
        return [-1] * factor.size
    groups = group_size // factor.size
    group = outer // (positions // groups) if groups > 1 else 0
    return [group * factor.size + i for i in range(factor.size)]


@torch.no_grad()
def permute_group(model: nn.Module, group: Group, order: Sequence[int]) -> None:
    """Reorder a group's units in every parameter slice it owns (a function-preserving rewrite)."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    sizes = {group.name: group.size}
    for piece in group.slices:
        tensor = tensors[piece.param]
        target = torch.tensor(slice_indices(piece, {}, sizes), device=tensor.device)
        source = torch.tensor(slice_indices(piece, {group.name: order}, sizes), device=tensor.device)
        tensor.index_copy_(piece.dim, target, tensor.index_select(piece.dim, source))
