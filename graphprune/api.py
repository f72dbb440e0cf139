"""`analyze`: source -> model -> traced graph -> channel axes -> named groups."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .analysis import AxisGraph, ConvSource, conv_sources, propagate
from .families import DerivedFamily, Family, family_for
from .groups import Group, Layer, Structure, build_structure
from .trace import load_model, trace


@dataclass
class Analysis:
    """Everything the passes need: the model, its graph, its groups and its layers."""

    model: nn.Module
    exported: torch.export.ExportedProgram
    axis_graph: AxisGraph
    structure: Structure
    family: Family | None
    params: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def groups(self) -> list[Group]:
        return self.structure.groups

    @property
    def layers(self) -> list[Layer]:
        return self.structure.layers

    def group(self, name: str) -> Group:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(f"no group {name!r}; groups are: {', '.join(g.name for g in self.groups)}")

    def slice_name(self, name: str) -> str | None:
        """The name under which the analysis knows a parameter or buffer (tied weights have several)."""
        return self._slice_names.get(name)

    @cached_property
    def _slice_names(self) -> dict[str, str]:
        slices = self.structure.param_slices
        tensors = [*self.model.named_parameters(remove_duplicate=False), *self.model.named_buffers(remove_duplicate=False)]
        known = {id(t): n for n, t in tensors if n in slices}
        return {n: known[id(t)] for n, t in tensors if id(t) in known}

    @cached_property
    def conv_sources(self) -> list[ConvSource]:
        """Depthwise convs and the linear rows feeding them (the x slice of each Mamba in_proj)."""
        return conv_sources(self.exported)

    def groups_of_kind(self, kind: str) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]

    def to_dict(self, with_slices: bool = False) -> dict[str, Any]:
        return {
            "model": type(self.model).__name__,
            "family": self.family.name if self.family else None,
            "config_keys": self.family.describe() if self.family else None,
            "params": self.params,
            "layers": [{"index": l.index, "kind": l.kind, "module": l.module, "params": l.params} for l in self.layers],
            "groups": [g.to_dict(with_slices) for g in self.groups],
            "seconds": {k: round(v, 3) for k, v in self.timings.items()},
        }


def unique_params(model: nn.Module) -> int:
    """Unique parameters (tied weights once), as transformers' `num_parameters()` counts them."""
    return sum(p.numel() for p in model.parameters())


def analyze(
    source: str | Path | nn.Module,
    *,
    meta: bool = False,
    seq_len: int | None = None,
    example: tuple[tuple, dict[str, Any]] | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] = lambda step: None,
) -> Analysis:
    """Load, trace and analyse a model; `progress` is told each step as it starts."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    progress("loading")
    model = load_model(source, meta=meta, trust_remote_code=trust_remote_code)
    timings["load"] = time.perf_counter() - start
    start = time.perf_counter()
    progress("tracing with torch.export")
    exported = trace(model, seq_len=seq_len, example=example)
    timings["trace"] = time.perf_counter() - start
    start = time.perf_counter()
    progress("analysing channel axes")
    axis_graph = propagate(exported)
    family = family_for(model)
    structure = build_structure(axis_graph, model, family.layer_kinds(model.config) if family else None)
    if family is not None:
        progress("deriving the family's config keys" if isinstance(family, DerivedFamily) else "checking the family")
        family = family.bind(structure, model)
    timings["analyze"] = time.perf_counter() - start
    return Analysis(model, exported, axis_graph, structure, family, unique_params(model), timings)
