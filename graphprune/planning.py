"""Targets -> feasible sizes per group -> kept units. Everything here runs before weights change.

Sizes are checked against every constraint the analysis derived: a balanced group keeps the same
number of units in each of its groups (Mamba heads per B/C group, query heads per KV head), fixed
parts never change, and a family whose checkpoint has one size per layer kind gets one.
"""

from __future__ import annotations

import math
from typing import Any
from dataclasses import dataclass, field

import torch

from .api import Analysis
from .errors import UserError
from .groups import Group, kept_size
from .spec import TargetsSpec


class PlanError(UserError):
    """The targets cannot be met; the message names the target and what would be valid."""


TARGET_KINDS = {"hidden_size": "hidden", "ffn_hidden_size": "ffn", "num_attention_heads": "attention_heads",
                "mamba_num_heads": "mamba_heads", "mamba_head_dim": "mamba_head_dim"}


@dataclass
class Plan:
    sizes: dict[str, int]                          # units kept per group (every group)
    dropped_layers: list[int] = field(default_factory=list)
    kept: dict[str, list[int]] = field(default_factory=dict)   # kept unit indices of shrunk groups

    def shrunk(self, analysis: Analysis) -> list[Group]:
        return [g for g in analysis.groups if g.kind != "layer" and self.sizes[g.name] < g.size]


def plan_sizes(analysis: Analysis, targets: TargetsSpec) -> Plan:
    """Sizes for every group from the targets (and a parameter budget over the axes not given), validated."""
    sizes = {g.name: g.size for g in analysis.groups}
    pinned: set[str] = set()
    for key, kind in TARGET_KINDS.items():
        value = getattr(targets, key)
        if value is None:
            continue
        groups = analysis.groups_of_kind(kind)
        if not groups:
            raise PlanError(f"targets.{key}: the model has no {kind} groups (it has: "
                            f"{', '.join(sorted({g.kind for g in analysis.groups}))})")
        for group in groups:
            sizes[group.name] = _check_size(f"targets.{key}", group, value)
        pinned.add(kind)
    if targets.groups:
        if analysis.family is not None:
            raise PlanError(f"targets.groups: {analysis.family.name} checkpoints have one size per layer kind, "
                            "so per-group sizes cannot be written; use the per-kind keys "
                            f"({', '.join(TARGET_KINDS)}) instead")
        for name, value in targets.groups.items():
            try:
                group = analysis.group(name)
            except KeyError as err:
                raise PlanError(f"targets.groups.{name}: {err.args[0]}") from None
            sizes[name] = _check_size(f"targets.groups.{name}", group, value)
    if targets.params is not None:
        sizes = _fit_budget(analysis, targets.params, sizes, pinned)
    plan = Plan(sizes)
    if targets.num_layers is not None:
        total = len(analysis.layers)
        if not analysis.layers:
            raise PlanError("targets.num_layers: no layers (residual blocks) were found in this model")
        if targets.num_layers > total:
            raise PlanError(f"targets.num_layers={targets.num_layers} is more than the model's {total} layers")
        sizes["layers"] = targets.num_layers
    return plan


def _check_size(where: str, group: Group, value: int) -> int:
    if value > group.size:
        raise PlanError(f"{where}={value} is larger than {group.name}'s {group.size}: pruning only shrinks")
    if value % group.balanced_groups:
        fixed = ", ".join(f"{k}={v}" for k, v in group.fixed.items())
        raise PlanError(f"{where}={value} is not a multiple of {group.balanced_groups}: {group.name} is balanced over "
                        f"{group.balanced_groups} groups ({fixed}); valid sizes are multiples of {group.balanced_groups} "
                        f"up to {group.size}")
    if value < group.balanced_groups:
        raise PlanError(f"{where}={value}: {group.name} needs at least one unit per group ({group.balanced_groups})")
    return value


def count_params(analysis: Analysis, sizes: dict[str, int], dropped_layers: list[int] | tuple = ()) -> int:
    """Parameters of the pruned model, from the slice layouts alone (works on meta)."""
    dropped = tuple(f"{analysis.layers[i].module}." for i in dropped_layers)
    group_sizes = {g.name: g.size for g in analysis.groups}
    return sum(math.prod(pruned_shape(analysis, name, param.shape, sizes, group_sizes))
               for name, param in analysis.model.named_parameters() if not name.startswith(dropped))


def pruned_shape(analysis: Analysis, name: str, shape: tuple[int, ...], sizes: dict[str, int],
                 group_sizes: dict[str, int] | None = None) -> tuple[int, ...]:
    """The shape of parameter or buffer `name` (of `shape`) once every group keeps `sizes` units
    (`group_sizes`: the groups' original sizes, when the caller has them at hand)."""
    group_sizes = group_sizes if group_sizes is not None else {g.name: g.size for g in analysis.groups}
    dims = analysis.structure.param_slices.get(analysis.slice_name(name), {})
    return tuple(sum(kept_size(s.layout, sizes, group_sizes) for s in dims[d]) if d in dims else size
                 for d, size in enumerate(shape))


BUDGET_KINDS = ("hidden", "ffn", "mamba_heads")


def pruned_config(analysis: Analysis, sizes: dict[str, int], dropped_layers: list[int] | tuple = ()) -> Any:
    """The family config of a plan: the new sizes, and the layers not dropped (the first `sizes["layers"]` of
    them, which is all of them once drop_layers ran). Raises FamilyMismatch when the family's class refuses it."""
    kept = [i for i in range(len(analysis.layers)) if i not in set(dropped_layers)]
    kept = kept[: sizes.get("layers", len(kept))]
    return analysis.family.pruned_config(analysis.model.config, kind_sizes(analysis, sizes), kept)


def valid_sizes(analysis: Analysis, sizes: dict[str, int]) -> bool:
    """Whether the family's own config class accepts these sizes (always, for models without a family)."""
    if analysis.family is None:
        return True
    from .families import FamilyMismatch

    try:
        pruned_config(analysis, sizes)
    except FamilyMismatch:
        return False
    return True


def size_step(group: Group) -> int:
    """The step a budget moves a width in: its balance unit, times 8 for wide channel axes (multiples of 8
    keep matmuls efficient)."""
    return group.balanced_groups * (8 if group.kind != "mamba_heads" and group.size >= 64 else 1)


def _fit_budget(analysis: Analysis, budget: int, start: dict[str, int], pinned: set[str]) -> dict[str, int]:
    """Shrink the axes not pinned (hidden, FFN, Mamba heads) by one common factor until the model fits the
    budget, each in its constraint's steps; a size the family's config rejects (Llama: hidden a multiple of
    the query heads) steps down until the config is valid."""
    if count_params(analysis, start) <= budget:
        return start
    scalable = [g for g in analysis.groups if g.kind in BUDGET_KINDS and g.kind not in pinned]
    if not scalable:
        raise PlanError("targets.params: no hidden, FFN or Mamba head axis is left to shrink (the others are pinned "
                        f"by explicit targets); the pinned sizes already need {count_params(analysis, start):,}")

    def sizes_at(factor: float) -> dict[str, int] | None:
        sizes = dict(start)
        for g in scalable:
            sizes[g.name] = max(size_step(g), int(g.size * factor) // size_step(g) * size_step(g))
        for kind in BUDGET_KINDS:  # lower a rejected axis one step at a time (one size per kind)
            groups = [g for g in scalable if g.kind == kind]
            while groups and not valid_sizes(analysis, sizes) and sizes[groups[0].name] > size_step(groups[0]):
                for g in groups:
                    sizes[g.name] -= size_step(g)
        return sizes if valid_sizes(analysis, sizes) else None

    def fits(factor: float) -> bool:
        sizes = sizes_at(factor)
        return sizes is not None and count_params(analysis, sizes) <= budget

    low, high = 0.0, 1.0
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    sizes = sizes_at(low)
    if sizes is None or count_params(analysis, sizes) > budget:
        smallest = count_params(analysis, sizes) if sizes else None
        raise PlanError(f"targets.params={budget:,} is below the smallest valid model these axes reach"
                        f"{f' ({smallest:,})' if smallest else ''}; add num_layers or choose a larger budget")
    # a coarse step (hidden in Llama) can leave budget unused: give it back to FFN, then Mamba heads, then hidden
    for kind in ("ffn", "mamba_heads", "hidden"):
        groups = [g for g in scalable if g.kind == kind]
        while groups and sizes[groups[0].name] + size_step(groups[0]) <= groups[0].size:
            grown = {**sizes, **{g.name: sizes[g.name] + size_step(g) for g in groups}}
            if count_params(analysis, grown) > budget or not valid_sizes(analysis, grown):
                break
            sizes = grown
    return sizes


def choose_units(group: Group, scores: torch.Tensor, keep: int, group_aware: bool = True) -> list[int]:
    """The `keep` best units; balanced groups keep the best keep/g of every group, in index order.

    group_aware=False is the naive baseline: best units overall, refilling the groups in rank order.
    """
    if group.balanced_groups == 1:
        return sorted(torch.topk(scores, keep).indices.tolist())
    per_group, unit_count = keep // group.balanced_groups, group.size // group.balanced_groups
    if not group_aware:
        return torch.topk(scores, keep).indices.tolist()
    kept = []
    for g in range(group.balanced_groups):
        local = scores[g * unit_count:(g + 1) * unit_count]
        kept += sorted((g * unit_count + i) for i in torch.topk(local, per_group).indices.tolist())
    return kept


def drop_lowest(scores: torch.Tensor, keep: int) -> list[int]:
    """Layers to drop: the least important, as indices in ascending order."""
    order = torch.argsort(scores)
    return sorted(order[: len(scores) - keep].tolist())


def kind_sizes(analysis: Analysis, sizes: dict[str, int]) -> dict[str, int]:
    """The new size of each shrunk group kind (one size per kind, as plan_sizes ensures for families)."""
    shrunk: dict[str, int] = {}
    for group in analysis.groups:
        if group.kind not in ("layer", "other") and sizes[group.name] < group.size:
            shrunk.setdefault(group.kind, sizes[group.name])
    return shrunk
