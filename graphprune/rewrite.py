"""The generic path: a pruned, runnable graph for models without a family adapter.

The exported program is unlifted into a GraphModule, its parameters and buffers are replaced by
the sliced ones, and every op whose constant arguments carry channel sizes (view shapes, split
sizes, slice bounds, conv groups, ...) is rewritten by its rewrite rule in `oprules.py`, from the
axes the analysis recorded for that node. The generic path traces with a symbolic batch and sequence
(`trace.trace`): those sizes are graph nodes (`sym_size` and arithmetic on it), not constants, and the
rules leave them, so the rewritten graph runs at any batch size and length.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from .analysis import node_arg, size_hint
from .api import Analysis
from .axes import Broadcast, Concat, Expr
from .oprules import rewrite_for
from .planning import Plan

DROPPED_OPS = {"aten._assert_tensor_metadata"}  # shape/dtype assertions of the traced sizes


class RewriteContext:
    def __init__(self, analysis: Analysis, kept_atoms: dict[int, int], node: fx.Node):
        self.analysis, self.node, self._kept_atoms = analysis, node, kept_atoms
        self.store = analysis.axis_graph.store

    def arg(self, index: int, default: Any = ...) -> Any:
        return node_arg(self.node, index, default)

    def out_axes(self) -> Any:
        return self.analysis.axis_graph.node_axes[self.node.name]

    def in_axes(self, node: fx.Node) -> tuple:
        axes = self.analysis.axis_graph.node_axes.get(node.name)
        return axes if axes is not None else (None,) * len(self.in_shape(node))

    def in_shape(self, node: fx.Node) -> tuple[int, ...]:
        return tuple(size_hint(s) for s in node.meta["val"].shape)

    def kept(self, expr: Expr) -> int:
        return sum(self._segment(seg) for seg in self.store.normalize(expr))

    def kept_before(self, expr: Expr, position: int) -> int:
        """Kept channels before an original position (a segment boundary, which the analysis cut)."""
        total = done = 0
        for segment in self.store.normalize(expr):
            if done >= position:
                break
            done += self.store.segment_size(segment)
            total += self._segment(segment)
        return total

    def _segment(self, segment: tuple) -> int:
        product = 1
        for factor in segment:
            if isinstance(factor, Broadcast):  # a repeat shrinks with the heads it was repeated for
                partner = self.store.partner(factor)
                product *= factor.size if partner is None else self._kept_atoms.get(partner, factor.size)
            elif isinstance(factor, Concat):
                product *= sum(self._segment(s) for s in self.store.normalize(factor.parts))
            else:
                root = self.store.find(factor)
                product *= self._kept_atoms.get(root, self.store.sizes[root])
        return product


def kept_atom_sizes(analysis: Analysis, plan: Plan) -> dict[int, int]:
    """Kept units per atom: a balanced group keeps sizes/balanced units of its atom in each group."""
    store = analysis.axis_graph.store
    return {store.find(g.atoms[0]): plan.sizes[g.name] // g.balanced_groups
            for g in analysis.groups if g.atoms and plan.sizes[g.name] < g.size}


def rewrite_graph(analysis: Analysis, plan: Plan, state_dict: dict[str, torch.Tensor]) -> fx.GraphModule:
    module = analysis.exported.module()
    for name, tensor in state_dict.items():
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = torch.nn.Parameter(tensor, requires_grad=False) if isinstance(getattr(owner, attr), torch.nn.Parameter) else tensor
        setattr(owner, attr, value)
    kept = kept_atom_sizes(analysis, plan)
    graph = module.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if str(getattr(node.target, "overloadpacket", "")) in DROPPED_OPS:
            graph.erase_node(node)
            continue
        rule = rewrite_for(node.target)
        if rule is not None and node.name in analysis.axis_graph.node_axes:
            node.args = rule(RewriteContext(analysis, kept, node))
    graph.lint()
    module.recompile()
    return module
