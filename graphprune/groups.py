"""From atoms to prunable groups: structure, roles, stable names and the parameter slices they own.

Roles come from how the graph used each atom, never from module class names:
- `embedding_dim` (rows of the embedding table)          -> the residual stream, `hidden`
- batch axis of a contraction between two activations     -> heads (attention, or Mamba when the
                                                              channels went through a depthwise conv)
- the axis right after a head in a product (H x P)       -> head_dim
- other channels of the depthwise conv (B, C)            -> SSM state: fixed
- repeated to meet heads (repeat_interleave / repeat_kv)  -> B/C groups or KV heads: fixed; the heads
                                                              are balanced over them
- everything else inside one layer                        -> FFN neurons
Vocabulary, graph outputs, conv kernels and channels an op mixed (cumsum over channels, ...) are
fixed. A family adapter may add names and config keys, never different structure.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import networkx as nx
from torch import nn

from .analysis import AxisGraph
from .axes import AxisStore, Concat, Segment

KINDS = ("hidden", "ffn", "attention_heads", "attention_head_dim", "mamba_heads", "mamba_head_dim", "layer", "other")
FIXED_TAGS = {"vocab": "vocab", "io": "model output", "kernel": "conv_kernel", "mixed": "mixed channels",
              "selected": "selected channel", "constant": "constant channels"}


@dataclass(frozen=True)
class LayoutFactor:
    """One factor of a parameter slice's row-major layout: a group (or fixed part) and its size."""

    name: str
    size: int
    fixed: bool = False


@dataclass(frozen=True)
class LayoutConcat:
    """A concatenation nested inside a product, e.g. the two rotary halves of a head_dim."""

    parts: tuple[tuple[LayoutFactor | LayoutConcat, ...], ...]


@dataclass(frozen=True)
class ParamSlice:
    """Indices [start, stop) of dimension `dim` of `param`, laid out as the row-major `layout`.

    A pass that keeps some units of each factor keeps the Cartesian product of their indices
    (balanced factors choose per outer group): the slice can be cut from this data alone.
    """

    param: str
    dim: int
    start: int
    stop: int
    layout: tuple[LayoutFactor | LayoutConcat, ...]
    buffer: bool = False


@dataclass
class Group:
    name: str
    kind: str
    layer: int | None
    size: int
    unit: int
    balanced_groups: int
    params: int
    fixed: dict[str, int] = field(default_factory=dict)
    slices: list[ParamSlice] = field(default_factory=list)
    config_key: str | None = None
    atoms: tuple[int, ...] = field(default=(), repr=False)

    def to_dict(self, with_slices: bool = False) -> dict:
        out = {"name": self.name, "kind": self.kind, "layer": self.layer, "size": self.size,
               "balanced_groups": self.balanced_groups, "unit": self.unit, "params": self.params,
               "fixed": self.fixed, "config_key": self.config_key}
        if with_slices:
            out["slices"] = [{"param": s.param, "dim": s.dim, "start": s.start, "stop": s.stop} for s in self.slices]
        return out


@dataclass
class Layer:
    index: int
    kind: str
    module: str
    params: int


@dataclass
class Structure:
    groups: list[Group]
    layers: list[Layer]
    fixed_parts: dict[int, str]
    # every channel dimension of every parameter/buffer, as its segments in order
    param_slices: dict[str, dict[int, list[ParamSlice]]] = field(default_factory=dict)


def kept_size(layout: tuple, sizes: dict[str, int], group_sizes: dict[str, int]) -> int:
    """Length of a slice with `layout` once each group in `sizes` keeps that many of its `group_sizes` units."""
    product = 1
    for factor in layout:
        if isinstance(factor, LayoutConcat):
            product *= sum(kept_size(part, sizes, group_sizes) for part in factor.parts)
        elif factor.name in sizes and factor.name in group_sizes:
            product *= sizes[factor.name] * factor.size // group_sizes[factor.name]
        else:
            product *= factor.size
    return product


@dataclass
class _Roles:
    """Per finest atom: where it sits in parameters and what the graph did with it."""

    store: AxisStore
    param_shapes: dict[str, tuple[int, ...]]
    tags: dict[int, set[str]] = field(default_factory=dict)
    slices: dict[int, list[tuple[ParamSlice, Segment]]] = field(default_factory=dict)
    layers: dict[int, set[int | None]] = field(default_factory=dict)
    outer: dict[int, set[int]] = field(default_factory=dict)
    followers: dict[int, set[int]] = field(default_factory=dict)


def find_layer_container(model: nn.Module) -> str | None:
    """The ModuleList holding the most parameters: its children are the residual blocks."""
    best, best_params = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > best_params:
                best, best_params = name, count
    return best


def build_structure(axis_graph: AxisGraph, model: nn.Module, layer_kinds: list[str] | None = None) -> Structure:
    container = find_layer_container(model)
    layer_of = _layer_indexer(container)
    roles = _collect_roles(axis_graph, layer_of)
    fixed = _fixed_atoms(roles)
    heads = {a for a, t in roles.tags.items() if "act_batch" in t and a not in fixed}
    groups, names = _group_atoms(roles, fixed, heads)
    structure = Structure(groups=groups, layers=[], fixed_parts=fixed,
                          param_slices=_all_slices(axis_graph, names, fixed))
    structure.layers = _layers(model, container, groups, layer_kinds)
    if structure.layers:
        structure.groups.append(Group(
            name="layers", kind="layer", layer=None, size=len(structure.layers), unit=1, balanced_groups=1,
            params=sum(layer.params for layer in structure.layers),
        ))
    return structure


def _layer_indexer(container: str | None):
    pattern = re.compile(rf"^{re.escape(container)}\.(\d+)\." if container else r"^$")

    def layer_of(param: str) -> int | None:
        match = pattern.match(param)
        return int(match.group(1)) if match else None

    return layer_of


def _collect_roles(axis_graph: AxisGraph, layer_of) -> _Roles:
    store = axis_graph.store
    roles = _Roles(store, axis_graph.param_shapes)
    for param, axes in axis_graph.param_axes.items():
        for dim, expr in enumerate(axes):
            if expr is None:
                continue
            start = 0
            for segment in store.normalize(expr):
                stop = start + store.segment_size(segment)
                piece = ParamSlice(param, dim, start, stop, (), buffer=param in axis_graph.buffer_names)
                for atom in dict.fromkeys(store.atoms_of((segment,))):
                    roles.slices.setdefault(atom, []).append((piece, segment))
                    roles.layers.setdefault(atom, set()).add(layer_of(param))
                    roles.tags[atom] = store.tags(atom)
                _record_followers(roles, segment)
                start = stop
    for pairing in store.pairings:
        outer = [a for o in pairing.outer for a in store.finest_atoms(o)]
        for atom in store.finest_atoms(pairing.atom):
            roles.outer.setdefault(atom, set()).update(outer)
            outer.append(atom)
    return roles


def _record_followers(roles: _Roles, segment: Segment) -> None:
    """Remember which atoms come right after which in a product (head -> head_dim)."""
    for before, after in zip(segment, segment[1:]):
        if isinstance(before, Concat):
            continue
        followers = roles.followers.setdefault(roles.store.find(before), set())
        followers.update(roles.store.atoms_of(((after,),)))


def _fixed_atoms(roles: _Roles) -> dict[int, str]:
    fixed: dict[int, str] = {}
    for atom, tags in roles.tags.items():
        for tag, role in FIXED_TAGS.items():
            if tag in tags:
                fixed[atom] = role
                break
    for outers in roles.outer.values():
        for atom in outers:
            if atom in roles.tags:
                fixed[atom] = "n_groups" if "depthwise_conv" in roles.tags[atom] else "kv_heads"
    return fixed


def _classify(atom: int, roles: _Roles, heads: set[int]) -> str | None:
    tags = roles.tags[atom]
    follows_head = any(atom in roles.followers.get(h, ()) for h in heads)
    if "embedding_dim" in tags:
        return "hidden"
    if "depthwise_conv" in tags:
        if atom in heads:
            return "mamba_heads"
        return "mamba_head_dim" if follows_head else None  # B/C channels: the SSM state
    if atom in heads:
        return "attention_heads"
    if follows_head or "attention" in tags:
        return "attention_head_dim"
    layers = roles.layers[atom]
    return "ffn" if len(layers) == 1 and None not in layers else "other"


def _group_atoms(roles: _Roles, fixed: dict[int, str], heads: set[int]) -> list[Group]:
    # Atoms decided together are connected: a balanced atom and the groups it is balanced over.
    graph = nx.Graph()
    graph.add_nodes_from(roles.tags)
    for atom, outers in roles.outer.items():
        graph.add_edges_from((atom, o) for o in outers if o in fixed)
    kinds = {atom: _classify(atom, roles, heads) for atom in roles.tags if atom not in fixed}
    fixed.update({atom: "ssm_state" for atom, kind in kinds.items() if kind is None})
    groups: list[Group] = []
    for component in nx.connected_components(graph):
        for atom in sorted(component):
            if atom not in fixed:
                groups.append(_make_group(atom, kinds[atom], roles, fixed))
    names = _name_groups(groups, roles, fixed)
    ordered = sorted(groups, key=lambda g: (g.layer if g.layer is not None else -1, KINDS.index(g.kind), g.name))
    return ordered, names


def _make_group(atom: int, kind: str, roles: _Roles, fixed: dict[int, str]) -> Group:
    store = roles.store
    balanced_over = sorted(o for o in roles.outer.get(atom, ()) if o in fixed)
    balanced = math.prod(store.sizes[o] for o in balanced_over)
    layers = roles.layers[atom]
    layer = next(iter(layers)) if len(layers) == 1 else None
    unit = max((_inner_size(store, seg, atom) for _, seg in roles.slices[atom]), default=1)
    same_product = {a for _, seg in roles.slices[atom] for a in store.atoms_of((seg,))}
    if kind.startswith(("mamba", "attention")):
        same_product |= _layer_fixed(roles, fixed, layer)
    return Group(
        name="", kind=kind, layer=layer, size=store.sizes[atom] * balanced, unit=unit, balanced_groups=balanced,
        params=0, atoms=(atom, *balanced_over),
        fixed={fixed[a]: store.sizes[a] for a in sorted(same_product) if a in fixed},
    )


def _layer_fixed(roles: _Roles, fixed: dict[int, str], layer: int | None) -> set[int]:
    """Fixed parts of the same layer that belong to its SSM/attention (state, groups, kernel)."""
    if layer is None:
        return set()
    return {a for a in fixed if roles.layers.get(a) == {layer} and fixed[a] in ("ssm_state", "n_groups", "kv_heads", "conv_kernel")}


def _inner_size(store: AxisStore, segment: Segment, atom: int) -> int:
    for i, factor in enumerate(segment):
        if atom in store.atoms_of(((factor,),)) and not isinstance(factor, Concat):
            return math.prod(store.size(f) for f in segment[i + 1:])
    return 1


SUFFIX = {"hidden": "hidden", "ffn": "ffn", "mamba_heads": "mamba.heads", "mamba_head_dim": "mamba.head_dim",
          "attention_heads": "attention.heads", "other": "channels"}


def _name_groups(groups: list[Group], roles: _Roles, fixed: dict[int, str]) -> dict[int, str]:
    names_of_atom: dict[int, str] = {}
    taken: dict[str, int] = {}
    for group in groups:
        atom = group.atoms[0]
        suffix = SUFFIX.get(group.kind)
        if group.kind == "attention_head_dim":
            suffix = "attention.v_head_dim" if "act_contract" not in roles.tags[atom] and "act_free" in roles.tags[atom] else "attention.head_dim"
        base = suffix if group.layer is None else f"layers.{group.layer}.{suffix}"
        count = taken.get(base, 0)
        taken[base] = count + 1
        group.name = base if count == 0 else f"{base}.{count}"
        names_of_atom[atom] = group.name
    for atom, role in fixed.items():
        layers = roles.layers.get(atom, {None})
        layer = next(iter(layers)) if len(layers) == 1 else None
        family = "mamba." if role in ("n_groups", "ssm_state", "conv_kernel") else "attention." if role == "kv_heads" else ""
        names_of_atom.setdefault(atom, role.replace(" ", "_") if layer is None else f"layers.{layer}.{family}{role.replace(' ', '_')}")
    for group in groups:
        group.slices = _owned_slices(roles, group.atoms[0], names_of_atom, fixed)
        group.params = _owned_params(group.slices, roles)
    return names_of_atom


def _layout(store: AxisStore, segment: Segment, names: dict[int, str], fixed: dict[int, str]) -> tuple:
    out = []
    for f in segment:
        if isinstance(f, Concat):
            out.append(LayoutConcat(tuple(_layout(store, seg, names, fixed) for seg in store.normalize(f.parts))))
        else:
            root = store.find(f)
            out.append(LayoutFactor(names.get(root, f"atom{root}"), store.sizes[root], root in fixed))
    return tuple(out)


def _owned_slices(roles: _Roles, atom: int, names: dict[int, str], fixed: dict[int, str]) -> list[ParamSlice]:
    return [ParamSlice(p.param, p.dim, p.start, p.stop, _layout(roles.store, seg, names, fixed), p.buffer)
            for p, seg in roles.slices[atom]]


def _all_slices(axis_graph: AxisGraph, names: dict[int, str], fixed: dict[int, str]) -> dict[str, dict[int, list[ParamSlice]]]:
    store = axis_graph.store
    out: dict[str, dict[int, list[ParamSlice]]] = {}
    for param, axes in axis_graph.param_axes.items():
        for dim, expr in enumerate(axes):
            if expr is None:
                continue
            start, pieces = 0, []
            for segment in store.normalize(expr):
                stop = start + store.segment_size(segment)
                pieces.append(ParamSlice(param, dim, start, stop, _layout(store, segment, names, fixed),
                                         param in axis_graph.buffer_names))
                start = stop
            out.setdefault(param, {})[dim] = pieces
    return out


def _owned_params(slices: list[ParamSlice], roles: _Roles) -> int:
    """Parameter elements whose index involves the group (each parameter counted once)."""
    shapes = roles.param_shapes
    covered: dict[str, dict[int, int]] = {}
    for s in slices:
        if not s.buffer:
            covered.setdefault(s.param, {}).setdefault(s.dim, 0)
            covered[s.param][s.dim] += s.stop - s.start
    total = 0
    for param, dims in covered.items():
        shape = shapes[param]
        untouched = math.prod(1 - dims.get(d, 0) / size for d, size in enumerate(shape))
        total += round(math.prod(shape) * (1 - untouched))
    return total


def _layers(model: nn.Module, container: str | None, groups: list[Group], kinds: list[str] | None) -> list[Layer]:
    if container is None:
        return []
    blocks = model.get_submodule(container)
    layers = []
    for index, block in enumerate(blocks):
        kind = kinds[index] if kinds else _generic_layer_kind(index, groups)
        params = sum(p.numel() for p in block.parameters())
        layers.append(Layer(index=index, kind=kind, module=f"{container}.{index}", params=params))
    return layers


def _generic_layer_kind(index: int, groups: list[Group]) -> str:
    kinds = {g.kind for g in groups if g.layer == index}
    parts = [name for name, marks in (("mamba", ("mamba_heads",)), ("attention", ("attention_heads",)),
                                      ("mlp", ("ffn",))) if kinds & set(marks)]
    return "+".join(parts) or "block"
