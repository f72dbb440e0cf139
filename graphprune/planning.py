"""Targets -> feasible sizes per group -> kept units. Everything here runs before weights change.

Sizes are checked against every constraint the analysis derived: a balanced group keeps the same
number of units in each of its groups (Mamba heads per B/C group, query heads per KV head), fixed
parts never change, and a family whose checkpoint has one size per layer kind gets one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .api import Analysis
from .groups import Group, LayoutConcat
from .spec import TargetsSpec


class PlanError(Exception):
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
    """Sizes for every group from the targets (or from a parameter budget), validated."""
    if targets.params is not None:
        return _fit_budget(analysis, targets.params)
    sizes = {g.name: g.size for g in analysis.groups}
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
    group_sizes = {g.name: g.size for g in analysis.groups}
    dropped = tuple(f"{analysis.layers[i].module}." for i in dropped_layers)
    total = 0
    for name, param in analysis.model.named_parameters():
        if name.startswith(dropped):
            continue
        dims = analysis.structure.param_slices.get(analysis.slice_name(name), {})
        numel = 1
        for d, size in enumerate(param.shape):
            numel *= sum(_kept_size(s.layout, sizes, group_sizes) for s in dims[d]) if d in dims else size
        total += numel
    return total


def _kept_size(layout: tuple, sizes: dict[str, int], group_sizes: dict[str, int]) -> int:
    product = 1
    for factor in layout:
        if isinstance(factor, LayoutConcat):
            product *= sum(_kept_size(part, sizes, group_sizes) for part in factor.parts)
        elif factor.name in sizes and factor.name in group_sizes:
            product *= sizes[factor.name] * factor.size // group_sizes[factor.name]
        else:
            product *= factor.size
    return product


def _fit_budget(analysis: Analysis, budget: int) -> Plan:
    """Shrink hidden, FFN and Mamba heads by one common factor until the model fits the budget."""
    full = {g.name: g.size for g in analysis.groups}
    if count_params(analysis, full) <= budget:
        return Plan(full)
    scalable = [g for g in analysis.groups if g.kind in ("hidden", "ffn", "mamba_heads")]
    if not scalable:
        raise PlanError("targets.params: the model has no hidden, FFN or Mamba head groups to shrink")

    def sizes_at(factor: float) -> dict[str, int]:
        sizes = dict(full)
        for g in scalable:
            step = g.balanced_groups * (8 if g.kind != "mamba_heads" and g.size >= 64 else 1)
            sizes[g.name] = max(step, int(g.size * factor) // step * step)
        return sizes

    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if count_params(analysis, sizes_at(middle)) <= budget else (low, middle)
    sizes = sizes_at(low)
    if count_params(analysis, sizes) > budget:
        raise PlanError(f"targets.params={budget:,} is below the smallest model these axes reach "
                        f"({count_params(analysis, sizes):,}); add num_layers or choose a larger budget")
    return Plan(sizes)


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


def config_values(analysis: Analysis, sizes: dict[str, int]) -> dict[str, int]:
    """Family config keys -> values of the shrunk groups (one size per kind, as plan_sizes ensures)."""
    values: dict[str, int] = {}
    for group in analysis.groups:
        if group.config_key and group.kind != "layer" and sizes[group.name] < group.size:
            values.setdefault(group.config_key, sizes[group.name])
    return values
