"""Channel-axis propagation over an exported aten graph.

Walks the graph once in topological order. Parameters and buffers get a fresh atom per dimension;
user inputs (token ids) carry none. Each call goes through its op rule (`oprules.py`), which
couples, refines and tags atoms in one `AxisStore`. The result, `AxisGraph`, says for every
parameter dimension which finest atoms it is made of; `groups.py` turns that into named groups.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind
from torch.fx import Node

from .axes import AxisError, AxisStore, Broadcast, Expr
from .errors import UserError
from .oprules import Axes, rule_for


class AnalysisError(UserError):
    """The analysis met an op it cannot follow on a channel axis."""


@dataclass
class AxisGraph:
    """What propagation learnt: atoms, the parameter axes built of them, and the coupling graph."""

    store: AxisStore
    param_axes: dict[str, Axes]
    param_shapes: dict[str, tuple[int, ...]]
    buffer_names: set[str]
    node_axes: dict[str, Any] = field(default_factory=dict)  # call nodes' output axes, by node name


def propagate(exported: ExportedProgram) -> AxisGraph:
    return _Propagation(exported).run()


class _Propagation:
    def __init__(self, exported: ExportedProgram):
        self.exported = exported
        self.store = AxisStore()
        self.axes: dict[Node, Any] = {}
        self.activations: set[Node] = set()
        self.result = AxisGraph(self.store, {}, {}, set())

    def run(self) -> AxisGraph:
        kinds = {spec.arg.name: spec for spec in self.exported.graph_signature.input_specs}
        for node in self.exported.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node, kinds.get(node.name))
            elif node.op == "call_function":
                self._call(node)
            elif node.op == "output":
                self._output(node)
        return self.result

    def _placeholder(self, node: Node, spec: Any) -> None:
        shape = _shape(node)
        used = len(node.users) > 0  # registered but unused (e.g. a spare copy of rotary frequencies)
        if spec is not None and spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and shape is not None and used:
            fqn = spec.target
            self.axes[node] = tuple(
                ((self.store.new_atom(size, f"{fqn}[{d}]"),),) if size > 1 else None for d, size in enumerate(shape)
            )
            self.result.param_axes[fqn] = self.axes[node]
            self.result.param_shapes[fqn] = tuple(shape)
            if spec.kind == InputKind.BUFFER:
                self.result.buffer_names.add(fqn)
            return
        if spec is not None and spec.kind == InputKind.USER_INPUT:
            self.activations.add(node)
        self.axes[node] = None if shape is None else (None,) * len(shape)

    def _call(self, node: Node) -> None:
        inputs = node.all_input_nodes
        if any(n in self.activations for n in inputs):
            self.activations.add(node)
        ctx = RuleContext(self, node)
        rule = rule_for(node.target)
        if rule is None:
            tracked = ctx.first_tracked_input()
            if tracked is not None:
                raise AnalysisError(
                    f"no channel rule for op {node.target} at {ctx.module_path()}: its input {tracked} "
                    "carries a channel axis. Add a rule with graphprune.oprules.register"
                    f"({str(node.target).rsplit('.', 1)[0]!r}) describing how channels flow through it."
                )
            shape = ctx.out_shape_or_none()
            self.axes[node] = None if shape is None else (None,) * len(shape)
            return
        try:
            self.axes[node] = rule(ctx)
        except AxisError as err:
            raise AnalysisError(f"op {node.target} at {ctx.module_path()}: {err}") from err
        self.result.node_axes[node.name] = self.axes[node]

    def _output(self, node: Node) -> None:
        for out in node.all_input_nodes:
            axes = self.axes.get(out)
            if isinstance(axes, tuple):
                for expr in axes:
                    RuleContext(self, node).tag(expr, "io")


class RuleContext:
    """What an op rule sees: its node, its inputs' axes and shapes, and the axis store."""

    def __init__(self, propagation: _Propagation, node: Node):
        self._p = propagation
        self.node = node
        self.store = propagation.store

    # --- arguments ---------------------------------------------------------------------------
    def op_name(self) -> str:
        return str(self.node.target)

    def arg(self, index: int, default: Any = ...) -> Any:
        """A positional argument; sizes computed from a symbolic batch or sequence read as the example's."""
        return _resolved(node_arg(self.node, index, default))

    def kwarg(self, name: str, default: Any = None) -> Any:
        return _resolved(self.node.kwargs.get(name, default))

    def tensor_args(self) -> list[Node]:
        found = [a for a in (*self.node.args, *self.node.kwargs.values()) if isinstance(a, Node)]
        return [a for a in found if isinstance(a.meta.get("val"), torch.Tensor)]

    def axes(self, node: Any) -> Axes:
        if not isinstance(node, Node):
            return ()
        axes = self._p.axes.get(node)
        if axes is None:
            return (None,) * len(_shape(node) or ())
        return axes

    def axes_list(self, node: Node) -> list[Axes]:
        return self._p.axes[node]

    def shape(self, node: Any) -> tuple[int, ...]:
        shape = _shape(node) if isinstance(node, Node) else None
        return tuple(shape) if shape is not None else ()

    def out_shape(self) -> tuple[int, ...]:
        return self.shape(self.node)

    def out_shape_or_none(self) -> tuple[int, ...] | None:
        return _shape(self.node)

    def out_shapes(self) -> list[tuple[int, ...]]:
        return [tuple(size_hint(s) for s in t.shape) for t in self.node.meta["val"]]

    def out_shape_of(self, index: int) -> tuple[int, ...]:
        val = self.node.meta["val"]
        return tuple(size_hint(s) for s in (val[index] if isinstance(val, (tuple, list)) else val).shape)

    def returns_tuple(self) -> bool:
        return isinstance(self.node.meta.get("val"), (tuple, list))

    def activations_meet(self, *nodes: Any) -> bool:
        """True when two or more operands depend on the model input (attention, SSM scan)."""
        return sum(1 for n in nodes if isinstance(n, Node) and n in self._p.activations) >= 2

    # --- axes --------------------------------------------------------------------------------
    def normalize(self, expr: Expr) -> Expr:
        return self.store.normalize(expr)

    def single(self, expr: Expr) -> tuple:
        expr = self.normalize(expr)
        if len(expr) != 1:
            raise AxisError(f"expected one block of channels, found a concatenation {self.store.describe(expr)}")
        return expr[0]

    def expr_size(self, expr: Expr) -> int:
        return self.store.expr_size(expr)

    def unify(self, a: Expr | None, b: Expr | None) -> Expr | None:
        if a is None or b is None:
            return a if b is None else b
        return self.store.unify(a, b)

    def unify_all(self, exprs: list[Expr]) -> Expr | None:
        merged = None
        for expr in exprs:
            merged = self.unify(merged, expr)
        return merged

    def tag(self, expr: Expr | None, *tags: str) -> None:
        if expr is not None:
            for atom in self.store.atoms_of(self.normalize(expr)):
                self.store.tag(atom, *tags)

    def tag_contraction(self, batch: list, contracted: list, free: list) -> None:
        """Tag the roles of axes in a contraction of two activations (attention scores, SSM scan)."""
        for role, exprs in (("act_batch", batch), ("act_contract", contracted), ("act_free", free)):
            for expr in exprs:
                self.tag(expr, role)

    def take(self, expr: Expr, start: int, stop: int) -> Expr:
        """The channels [start, stop) of a dimension, cutting its atoms where needed."""
        expr = self.store.cut(expr, {start, stop})
        out, pos = [], 0
        for seg in expr:
            if start <= pos < stop:
                out.append(seg)
            pos += self.store.segment_size(seg)
        return tuple(out)

    def concat(self, parts: list[tuple[Expr | None, int]]) -> Expr | None:
        """Concatenate dimensions; untracked parts become constant (never pruned) channels."""
        if all(expr is None for expr, _ in parts):
            return None
        out: list = []
        for expr, size in parts:
            if size == 0:
                continue
            if expr is None:
                out.append((self.store.new_atom(size, f"constant@{self.module_path()}", {"constant"}),))
            else:
                out.extend(self.normalize(expr))
        return tuple(out)

    def reshape_axes(self, axes: Axes, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Axes:
        """Map axes through a view: dims are grouped by equal products, then factored."""
        out: list[Expr | None] = [None] * len(out_shape)
        for in_dims, out_dims in _reshape_groups(in_shape, out_shape):
            if all(axes[d] is None for d in in_dims):
                continue
            if len(in_dims) == 1 and len(out_dims) == 1:
                out[out_dims[0]] = axes[in_dims[0]]
                continue
            factors: list = []
            for d in in_dims:
                if in_shape[d] == 1:
                    continue
                if axes[d] is None:
                    factors.append(Broadcast(in_shape[d]))
                else:
                    factors.extend(self.single(axes[d]))
            strides = {math.prod(out_shape[k] for k in out_dims[i:]) for i in range(1, len(out_dims))}
            segment = self.store.refine_strides(tuple(factors), strides)
            position = 0
            for d in out_dims:
                chunk, size = [], 1
                while size < out_shape[d]:
                    chunk.append(segment[position])
                    size *= self.store.size(segment[position])
                    position += 1
                is_channel = any(not isinstance(f, Broadcast) or f.uid is not None for f in chunk)
                out[d] = (tuple(chunk),) if is_channel else None
        return tuple(out)

    # --- diagnostics ---------------------------------------------------------------------------
    def module_path(self) -> str:
        stack = self.node.meta.get("nn_module_stack") or {}
        if not stack:
            return "<top level>"
        path, kind = list(stack.values())[-1]
        return f"{path or '<root>'} ({str(kind).rsplit('.', 1)[-1]})"

    def first_tracked_input(self) -> str | None:
        for i, node in enumerate(self.tensor_args()):
            for d, expr in enumerate(self.axes(node)):
                if expr is not None:
                    return f"#{i} ({node.name}) dim {d} = {self.describe(expr)}"
        return None

    def describe(self, expr: Expr | None) -> str:
        if expr is None:
            return "no channels"
        atoms = self.store.atoms_of(self.normalize(expr))
        origins = sorted({self.store.origins[a].split("/")[0] for a in atoms})
        return f"channels of {', '.join(origins[:3])}{' ...' if len(origins) > 3 else ''}"

    def error(self, reason: str, expr: Expr | None) -> AnalysisError:
        return AnalysisError(f"op {self.op_name()} at {self.module_path()}: {reason} ({self.describe(expr)})")


def node_arg(node: Node, index: int, default: Any = ...) -> Any:
    """Positional argument `index` of a call node, or `default` when the call omitted it."""
    if index < len(node.args):
        return node.args[index]
    if default is ...:
        raise AnalysisError(f"{node.target} ({node.name}): missing argument {index}")
    return default


def _shape(node: Node) -> tuple[int, ...] | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(size_hint(s) for s in val.shape)
    return None


_SYMBOLIC = {torch.SymInt: int, torch.SymFloat: float, torch.SymBool: bool}


def size_hint(value: Any) -> Any:
    """A size as the example had it. A graph traced with a symbolic batch and sequence (the generic path,
    see `trace.trace`) holds SymInts there; the analysis reads their example values without adding a
    guard. Channel dimensions are static in such a graph too, so the axes found are the same; the rewrite
    keeps the symbolic sizes (`oprules.rewrite_shape`). Anything else passes through."""
    cast = _SYMBOLIC.get(type(value))
    if cast is None:
        return value
    if value.node.hint is None:  # unbacked: computed from tensor data, not from input sizes
        raise AnalysisError(f"a size computed from tensor data ({value}) has no example value to analyse with")
    return cast(value.node.hint)


def _resolved(value: Any) -> Any:
    """An argument as a rule reads it: a node computing a size from symbolic dims becomes its example value."""
    if isinstance(value, Node) and type(value.meta.get("val")) in _SYMBOLIC:
        return size_hint(value.meta["val"])
    if isinstance(value, (list, tuple)):
        items = [_resolved(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _reshape_groups(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair runs of input and output dims with equal products; size-1 dims belong to no run."""
    groups = []
    i = j = 0
    while True:
        while i < len(in_shape) and in_shape[i] == 1:
            i += 1
        while j < len(out_shape) and out_shape[j] == 1:
            j += 1
        if i >= len(in_shape) or j >= len(out_shape):
            return groups
        in_dims, out_dims = [i], [j]
        p_in, p_out = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while p_in != p_out:
            if p_in < p_out:
                p_in *= in_shape[i]
                in_dims.append(i)
                i += 1
            else:
                p_out *= out_shape[j]
                out_dims.append(j)
                j += 1
        groups.append((in_dims, out_dims))


@dataclass(frozen=True)
class ConvSource:
    """A depthwise conv whose input channels are rows [offset, ...) of a linear layer's output."""

    conv_weight: str
    linear_weight: str
    offset: int


_PASS_THROUGH = {"aten.to", "aten._to_copy", "aten.contiguous", "aten.clone", "aten.alias", "aten.detach"}


def conv_sources(exported: ExportedProgram) -> list[ConvSource]:
    """Follow each depthwise conv's input back through splits, slices and transposes to a linear.

    This is how the `x` slice of a Mamba2 in_proj is found: the rows that feed the conv.
    """
    params = {spec.arg.name: spec.target for spec in exported.graph_signature.input_specs
              if spec.kind == InputKind.PARAMETER}
    # node -> (linear weight, channel dim, offset) for tensors that are re-indexed linear outputs
    source: dict[Node, Any] = {}
    found = []
    for node in exported.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "overloadpacket", node.target))
        args = node.args
        parent = source.get(args[0]) if args and isinstance(args[0], Node) else None
        if name == "aten.linear" and isinstance(args[1], Node) and args[1].name in params:
            source[node] = (params[args[1].name], len(_shape(node)) - 1, 0)
        elif parent is None:
            continue
        elif name in _PASS_THROUGH:
            source[node] = parent
        elif name in ("aten.transpose", "aten.permute"):
            ndim = len(_shape(node))
            order = list(range(ndim))
            if name == "aten.transpose":
                d0, d1 = (a % ndim for a in args[1:3])
                order[d0], order[d1] = order[d1], order[d0]
            else:
                order = [a % ndim for a in args[1]]
            source[node] = (parent[0], order.index(parent[1]), parent[2])
        elif name in ("aten.split_with_sizes", "aten.split"):
            ndim = len(_shape(args[0]))
            if (args[2] if len(args) > 2 else 0) % ndim == parent[1]:
                starts = [0]
                for piece in node.meta["val"][:-1]:
                    starts.append(starts[-1] + size_hint(piece.shape[parent[1]]))
                source[node] = [(parent[0], parent[1], parent[2] + s) for s in starts]
        elif node.target is operator.getitem and isinstance(parent, list):
            source[node] = parent[args[1]]
        elif name == "aten.slice":
            dim = args[1] % len(_shape(args[0]))
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            source[node] = (parent[0], parent[1], parent[2] + (start if dim == parent[1] else 0))
        elif name in ("aten.conv1d", "aten.convolution") and parent[1] == 1 and isinstance(args[1], Node):
            weight = args[1]
            while weight.name not in params and weight.args and isinstance(weight.args[0], Node):
                weight = weight.args[0]  # conv weight passed through squeeze/unsqueeze
            if weight.name in params:
                found.append(ConvSource(params[weight.name], parent[0], parent[2]))
    return found
