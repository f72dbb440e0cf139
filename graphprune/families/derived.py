"""The derived family: the config keys of any Hugging Face model, found by building its class on meta.

No module here knows the model. For each group kind the analysis found, a probe shrinks that kind to
a test size, computes every parameter's and buffer's pruned shape from the slices, and looks for the
fewest config changes under which the model's own class builds exactly those shapes (on the meta
device, so any size is free). The changes tried are numeric config values that equal a product or
ratio of group sizes: a key that is the size (`mamba_n_heads`), a product (`num_heads * head_dim`
style widths) or a ratio (`mamba_expand = heads * head_dim / hidden`), each scaled with the kind,
plus keys a class reads when present (`head_dim`, so that heads can shrink without the hidden size).
Depth is probed the same way: per-layer lists (`layer_types`, `layers_block_type`) are filtered,
layer-index lists (`attn_layer_indices`) renumbered and the layer count lowered.

Every pruned config is checked the same way before it is used: a config that does not build the
planned shapes is refused (FamilyMismatch), so a wrong derivation cannot write a wrong checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from ..groups import Group, Structure, kept_size
from .base import Family, FamilyMismatch, validate

# Keys a class reads when the config has them (else derives them, e.g. head_dim = hidden // heads):
# key -> (the kind whose unit it is, the kind it is the size of).
KEYS_READ_WHEN_PRESENT = {"head_dim": ("attention_heads", "attention_head_dim")}
MAX_CHANGES = 3        # config keys changed together for one kind
MAX_FACTORS = 3        # group sizes in one product or ratio
WIDTH_KINDS = ("hidden", "ffn", "attention_heads", "attention_head_dim", "mamba_heads", "mamba_head_dim")


@dataclass(frozen=True)
class Change:
    """One config key following the group sizes: value * prod((new / old) ** exponent) over kinds."""

    key: str
    exponent: int
    added: bool = False  # absent from the original config: written only when its kind shrinks


@dataclass
class KindRule:
    kind: str
    groups: list[str]
    changes: tuple[Change, ...] | None  # None: no config expresses this kind's size
    tried: list[str] = field(default_factory=list)
    reason: str = ""


@dataclass
class DepthRule:
    counts: tuple[str, ...] = ()         # keys holding the number of layers
    per_layer: tuple[str, ...] = ()      # lists with one entry per layer: filtered
    indices: tuple[str, ...] = ()        # lists of layer indices: kept ones renumbered
    ok: bool = True
    reason: str = ""


@dataclass
class DerivedFamily(Family):
    name: str = "derived"
    rules: dict[str, KindRule] = field(default_factory=dict)
    depth: DepthRule | None = None
    base_values: dict[str, Any] = field(default_factory=dict)   # original (or implied) value of each key
    _probe: _Probe | None = field(default=None, repr=False)
    _checked: dict[tuple, str | None] = field(default_factory=dict, repr=False)

    def trace_seq_len(self, config: Any) -> int:
        chunk = next((v for k, v in _numeric(config).items() if k.endswith("chunk_size")), None)
        return int(chunk) if chunk else 16

    def bind(self, structure: Structure, model: Any) -> DerivedFamily:
        probe = _Probe(model, structure)
        name = f"{self.name} (derived)" if self.model_types else f"derived ({model.config.model_type})"
        family = dataclasses.replace(self, name=name, rules={}, depth=None, _probe=probe, _checked={})
        family.base_values = {**_numeric(model.config), **probe.implied_keys()}
        for kind, groups in probe.kinds().items():
            family.rules[kind] = probe.derive_kind(kind, groups)
            changes = family.rules[kind].changes
            for group in groups:
                group.config_key = _primary(changes) if changes else None
        family.depth = probe.derive_depth() if structure.layers else None
        return family

    def summary_keys(self, structure: Structure) -> list[str]:
        derived = {change.key for rule in self.rules.values() for change in rule.changes or ()}
        return sorted(set(super().summary_keys(structure)) | derived)

    def describe(self) -> dict[str, Any]:
        """Per kind, the keys that follow its size (exponent: how each scales with it), or why none can."""
        out: dict[str, Any] = {}
        for kind, rule in self.rules.items():
            out[kind] = ({"keys": [c.key for c in rule.changes],
                          "scaling": {c.key: c.exponent for c in rule.changes}} if rule.changes is not None
                         else {"keys": [], "cannot": self.cannot(kind)})
        if self.depth is not None:
            out["layer"] = ({"keys": [*self.depth.counts, *self.depth.per_layer, *self.depth.indices]} if self.depth.ok
                            else {"keys": [], "cannot": self.depth.reason})
        return out

    def layer_count_key(self) -> str:
        return self.depth.counts[0] if self.depth and self.depth.counts else "num_layers"

    def cannot(self, kind: str) -> str | None:
        """Why this kind's size cannot be written (None when it can)."""
        rule = self.rules.get(kind)
        if kind == "layer":
            depth = self.depth
            return None if depth and depth.ok else (depth.reason if depth else "no layers were found")
        if rule is None:
            return f"no {kind} groups"
        if rule.changes is not None:
            return None
        tried = ", ".join(rule.tried) or "none (no numeric key equals a product or ratio of the group sizes)"
        because = f": {rule.reason}" if rule.reason else ""
        return (f"no config of {self._probe.model_class.__name__} builds the shapes of the {kind} groups "
                f"({_names(rule.groups)}) at a smaller size{because}; config keys tried: {tried}")

    def pruned_config(self, config: Any, kind_sizes: dict[str, int], kept_layers: list[int]) -> Any:
        n_layers = len(self._probe.structure.layers)
        shrunk = {k: v for k, v in kind_sizes.items() if v != self._probe.sizes.get(k)}
        for kind in [*shrunk, *(["layer"] if len(kept_layers) < n_layers else [])]:
            reason = self.cannot(kind)
            if reason is not None:
                raise FamilyMismatch(f"{self.name}: {reason}")
        new = copy.deepcopy(config)
        for key, value in self._values(shrunk).items():
            _set(new, key, value)
        if len(kept_layers) < n_layers:
            _keep_layers(new, config, self.depth, kept_layers)
        validate(self.name, new)
        dropped = [i for i in range(n_layers) if i not in set(kept_layers)]
        key = (tuple(sorted(shrunk.items())), tuple(dropped))
        if key not in self._checked:
            self._checked[key] = self._probe.mismatch(new, self._probe.group_sizes(shrunk), dropped)
        if self._checked[key] is not None:
            raise FamilyMismatch(f"{self.name}: the pruned config does not build the planned shapes: "
                                 f"{self._checked[key]}")
        return new

    def _values(self, shrunk: dict[str, int]) -> dict[str, Any]:
        """New value of every key that follows a shrunk kind."""
        exponents: dict[str, dict[str, int]] = {}
        needed: set[str] = set()
        for kind, rule in self.rules.items():
            for change in rule.changes or ():
                exponents.setdefault(change.key, {})[kind] = change.exponent
                if kind in shrunk:
                    needed.add(change.key)
        values = {}
        for key in needed:
            ratio = Fraction(1)
            for kind, exponent in exponents[key].items():
                ratio *= Fraction(shrunk.get(kind, self._probe.sizes[kind]), self._probe.sizes[kind]) ** exponent
            values[key] = _scaled(key, self.base_values[key], ratio)
        return values


# ------------------------------------------------------------------------------------------ probing


class _Probe:
    """The model class, its original shapes, and meta builds of candidate configs."""

    def __init__(self, model: Any, structure: Structure):
        self.model_class, self.config, self.structure = type(model), model.config, structure
        self.tensors = _named_tensors(model)
        slices = structure.param_slices
        known = {id(t): name for name, t in self.tensors.items() if name in slices}
        self.slice_names = {name: known.get(id(t)) for name, t in self.tensors.items()}
        self.shapes = {name: tuple(t.shape) for name, t in self.tensors.items()}
        self.kind_groups = {}
        for group in structure.groups:
            if group.kind in WIDTH_KINDS:
                self.kind_groups.setdefault(group.kind, []).append(group)
        self.sizes = {kind: groups[0].size for kind, groups in self.kind_groups.items()
                      if len({g.size for g in groups}) == 1}
        self.values = _numeric(self.config)
        # a forward on meta also checks keys only the forward reads; some models cannot run one (their
        # mask code reads values), and then shapes and the config's validation decide alone
        self.forward_checks = _meta_forward(self.model_class, self.config) is None

    def kinds(self) -> dict[str, list[Group]]:
        return self.kind_groups

    def implied_keys(self) -> dict[str, Any]:
        """Keys absent from the config whose value the analysis knows (what the class derives instead)."""
        implied = {}
        for key, (unit_of, _) in KEYS_READ_WHEN_PRESENT.items():
            if key not in self.values and unit_of in self.kind_groups:
                implied[key] = self.kind_groups[unit_of][0].unit
        return implied

    def group_sizes(self, kind_sizes: dict[str, int]) -> dict[str, int]:
        return {g.name: kind_sizes.get(g.kind, g.size) for g in self.structure.groups}

    def expected(self, sizes: dict[str, int], dropped: list[int]) -> dict[str, tuple[int, ...]]:
        """Every parameter's and buffer's shape once the groups keep `sizes` units and `dropped` layers go."""
        original = {g.name: g.size for g in self.structure.groups}
        renamed = _layer_renaming(self.structure, dropped)
        shapes = {}
        for name, shape in self.shapes.items():
            new_name = renamed(name)
            if new_name is None:
                continue
            dims = self.structure.param_slices.get(self.slice_names[name] or "", {})
            shapes[new_name] = tuple(
                sum(kept_size(s.layout, sizes, original) for s in dims[d]) if d in dims else size
                for d, size in enumerate(shape))
        return shapes

    def mismatch(self, config: Any, sizes: dict[str, int], dropped: list[int]) -> str | None:
        """None when the class builds exactly the planned shapes from `config`, else what differs."""
        built = _build(self.model_class, config)
        if isinstance(built, str):
            return built
        want = self.expected(sizes, dropped)
        if built == want:
            return _meta_forward(self.model_class, config) if self.forward_checks else None
        differ = [f"{n} {built.get(n)} (planned {want.get(n)})" for n in sorted(set(built) | set(want))
                  if built.get(n) != want.get(n)]
        return f"{len(differ)} tensors differ, e.g. {'; '.join(differ[:3])}"

    # ---------------------------------------------------------------- widths

    def derive_kind(self, kind: str, groups: list[Group]) -> KindRule:
        names = [g.name for g in groups]
        if kind not in self.sizes:
            return KindRule(kind, names, None, reason="its groups have different sizes in different layers, "
                                                      "and a config has one size per kind")
        options = self._options(kind)
        tried = sorted({key for key, _ in options})
        found: list[tuple[Change, ...]] = []
        for size in _test_sizes(groups[0]):
            matches = self._search(kind, size, options)
            if found:  # a second size to tell apart changes that fit the first by coincidence
                matches = [m for m in found if m in matches]
            found = matches
            if len(found) == 1:
                break
        if len(found) == 1:
            return KindRule(kind, names, found[0], tried)
        if found:
            ways = " or ".join("{" + ", ".join(c.key for c in m) + "}" for m in found)
            return KindRule(kind, names, None, tried, reason=f"several configs fit ({ways})")
        return KindRule(kind, names, None, tried)

    def _options(self, kind: str) -> list[tuple[str, Change]]:
        """(key, change) candidates: keys equal to a product or ratio of group sizes that involves `kind`."""
        options = []
        for key, value in self.values.items():
            for exponent in sorted(_exponents_of(Fraction(value).limit_denominator(10**6), kind, self.sizes)):
                options.append((key, Change(key, exponent)))
        for key, value in self.implied_keys().items():
            exponent = 1 if KEYS_READ_WHEN_PRESENT[key][1] == kind else 0
            options.append((key, Change(key, exponent, added=True)))
        return options

    def _search(self, kind: str, size: int, options: list[tuple[str, Change]]) -> list[tuple[Change, ...]]:
        """The smallest sets of changes under which the class builds the shapes of `kind` at `size`.

        Each change alone is built first: one that alters no shape and breaks nothing is not about sizes
        and is left out (keys the class only reads when present stay: they matter in combination).
        """
        want = self.expected(self.group_sizes({kind: size}), [])
        ratio = Fraction(size, self.sizes[kind])
        configs, touched = {}, {}
        for key, change in options:
            config = self._changed({key: change}, ratio)
            if config is None:
                continue
            built = _build(self.model_class, config)
            touched[change] = set(want) if isinstance(built, str) else {
                name for name, shape in built.items() if self.shapes.get(name) != shape}
            if not touched[change] and not change.added and self.builds(config, self.shapes):
                del touched[change]  # changes no shape and breaks nothing: not a size key
            configs[change] = config
        useful = [(key, change) for key, change in options if change in touched]
        for count in range(1, MAX_CHANGES + 1):
            matches = []
            for combo in itertools.combinations(useful, count):
                if len({key for key, _ in combo}) < count:
                    continue
                config = self._changed(dict(combo), ratio)
                if config is not None and self.builds(config, want):
                    matches.append(tuple(change for _, change in combo))
            if matches:
                return matches
        return []

    def _changed(self, changes: dict[str, Change], ratio: Fraction) -> Any | None:
        """A copy of the config with these keys scaled by `ratio` ** exponent (None: a value it cannot take)."""
        implied = self.implied_keys()
        config = copy.deepcopy(self.config)
        try:
            for key, change in changes.items():
                base = implied[key] if change.added else self.values[key]
                _set(config, key, _scaled(key, base, ratio ** change.exponent))
        except (FamilyMismatch, ValueError, TypeError, AttributeError):
            return None
        return config

    def builds(self, config: Any, want: dict[str, tuple[int, ...]]) -> bool:
        """Whether `config` passes its class' validation, builds `want` and runs a forward on meta (a key
        that only the forward reads, e.g. a head size used in a reshape, must agree with the weights too)."""
        if not _valid(config):
            return False
        return _build(self.model_class, config) == want and (
            not self.forward_checks or _meta_forward(self.model_class, config) is None)

    # ---------------------------------------------------------------- depth

    def derive_depth(self) -> DepthRule:
        n = len(self.structure.layers)
        per_layer = tuple(k for k, v in vars_of(self.config).items()
                          if isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(x, str) for x in v))
        counts = [k for k, v in self.values.items() if v == n and isinstance(v, int)]
        indices = [k for k, v in vars_of(self.config).items() if _layer_index_list(v, n)]
        dropped = [0] if n > 1 else []
        if not dropped:
            return DepthRule(ok=False, reason="the model has one layer")
        want = self.expected(self.group_sizes({}), dropped)
        kept = list(range(1, n))
        for count in range(0, len(counts) + len(indices) + 1):
            for combo in itertools.combinations([("count", k) for k in counts] + [("index", k) for k in indices], count):
                rule = DepthRule(counts=tuple(k for t, k in combo if t == "count"), per_layer=per_layer,
                                 indices=tuple(k for t, k in combo if t == "index"))
                config = copy.deepcopy(self.config)
                try:
                    _keep_layers(config, self.config, rule, kept)
                except (ValueError, TypeError, AttributeError):
                    continue
                if self.builds(config, want):
                    return rule
        return DepthRule(ok=False, reason=(
            f"no config of {self.model_class.__name__} builds the model without its first layer; tried the "
            f"per-layer lists [{', '.join(per_layer) or 'none found'}], layer-index lists "
            f"[{', '.join(indices) or 'none found'}] and layer counts [{', '.join(counts) or 'none found'}]"))


# ------------------------------------------------------------------------------------------ helpers


def vars_of(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_")}


def _numeric(config: Any) -> dict[str, int | float]:
    """The config's top-level numbers (no booleans): the keys a size can live in."""
    return {k: v for k, v in vars_of(config).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0}


def _exponents_of(value: Fraction, kind: str, sizes: dict[str, int]) -> set[int]:
    """Exponents of `kind` in the products and ratios of group sizes (at most MAX_FACTORS) equal to `value`."""
    kinds = sorted(sizes)
    if kind not in kinds:
        return set()
    position = kinds.index(kind)
    found = set()
    for exponents in itertools.product((-1, 0, 1), repeat=len(kinds)):
        if exponents[position] == 0 or sum(e != 0 for e in exponents) > MAX_FACTORS:
            continue
        up = {sizes[k] for k, e in zip(kinds, exponents) if e > 0}
        if up & {sizes[k] for k, e in zip(kinds, exponents) if e < 0}:
            continue  # x / x: equal to 1 by coincidence of sizes, not a relation
        product = Fraction(1)
        for k, e in zip(kinds, exponents):
            product *= Fraction(sizes[k]) ** e
        if product == value:
            found.add(exponents[position])
    return found


def _scaled(key: str, base: Any, ratio: Fraction) -> Any:
    value = Fraction(base).limit_denominator(10**6) * ratio
    if isinstance(base, int):
        if value.denominator != 1:
            raise FamilyMismatch(f"{key} would be {float(value):g}, which is not a whole number")
        return int(value)
    return float(value)


def _set(config: Any, key: str, value: Any) -> None:
    setattr(config, key, value)
    if getattr(config, key) != value:  # a read-only or derived attribute
        raise AttributeError(key)


def _keep_layers(new: Any, old: Any, rule: DepthRule, kept: list[int]) -> None:
    for key in rule.per_layer:
        _set(new, key, [getattr(old, key)[i] for i in kept])
    position = {old_index: new_index for new_index, old_index in enumerate(kept)}
    for key in rule.indices:
        _set(new, key, [position[i] for i in getattr(old, key) if i in position])
    for key in rule.counts:
        _set(new, key, len(kept))


def _layer_index_list(value: Any, n: int) -> bool:
    return (isinstance(value, (list, tuple)) and 0 < len(value) < n
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in value)
            and list(value) == sorted(set(value)))


def _test_sizes(group: Group) -> list[int]:
    step = group.balanced_groups
    sizes = [group.size // 2 // step * step, group.size - step, group.size * 3 // 4 // step * step]
    return list(dict.fromkeys(s for s in sizes if 0 < s < group.size))


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict([*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)])


_BUILT: dict[tuple, Any] = {}


def _config_key(model_class: type, config: Any) -> tuple:
    return (model_class, config.to_json_string(use_diff=False))


def _build(model_class: type, config: Any) -> dict[str, tuple[int, ...]] | str:
    """Shapes of every parameter and buffer of the class built from `config` on meta, or why it failed."""
    key = ("shapes", *_config_key(model_class, config))
    if key not in _BUILT:
        model = _meta_model(model_class, config)
        _BUILT[key] = model if isinstance(model, str) else {n: tuple(t.shape) for n, t in _named_tensors(model).items()}
    return _BUILT[key]


def _meta_forward(model_class: type, config: Any, length: int = 8) -> str | None:
    """None when the class built from `config` runs a forward on meta tensors, else the error."""
    key = ("forward", *_config_key(model_class, config))
    if key not in _BUILT:
        model = _meta_model(model_class, config)
        if isinstance(model, str):
            _BUILT[key] = model
        else:
            try:
                with torch.no_grad():
                    model(input_ids=torch.zeros(1, length, dtype=torch.long, device="meta"), use_cache=False)
                _BUILT[key] = None
            except Exception as err:  # a shape error anywhere in the model's forward
                _BUILT[key] = f"its forward fails: {type(err).__name__}: {str(err).strip()[:200]}"
    return _BUILT[key]


def _valid(config: Any) -> bool:
    key = ("valid", type(config), config.to_json_string(use_diff=False))
    if key not in _BUILT:
        try:
            validate("", config)
            _BUILT[key] = True
        except FamilyMismatch:
            _BUILT[key] = False
    return _BUILT[key]


def _meta_model(model_class: type, config: Any) -> nn.Module | str:
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            return model_class(copy.deepcopy(config)).eval()
    except Exception as err:  # any model code may refuse a config, in any way
        return f"{model_class.__name__} could not be built: {type(err).__name__}: {str(err).strip()[:200]}"
    finally:
        logger.setLevel(level)


def _layer_renaming(structure: Structure, dropped: list[int]):
    """Tensor name -> its name once `dropped` layers are gone and the rest renumbered (None: dropped)."""
    if not dropped:
        return lambda name: name
    container = structure.layers[0].module.rsplit(".", 1)[0] + "."
    new_index = {old: new for new, old in enumerate(i for i in range(len(structure.layers)) if i not in set(dropped))}

    def rename(name: str) -> str | None:
        if not name.startswith(container):
            return name
        index, rest = name[len(container):].split(".", 1)
        return None if int(index) in set(dropped) else f"{container}{new_index[int(index)]}.{rest}"
    return rename


def _primary(changes: tuple[Change, ...]) -> str:
    """The key that is the kind's size itself (exponent 1, present in the config), else the first."""
    direct = [c.key for c in changes if c.exponent == 1 and not c.added]
    return (direct or [c.key for c in changes])[0]


def _names(groups: list[str]) -> str:
    return ", ".join(groups[:3]) + (f", ... ({len(groups)})" if len(groups) > 3 else "")
