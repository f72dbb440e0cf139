"""Channel axes: the algebra the analysis runs on.

Every tensor dimension that carries channels is described by an *expression*: a concatenation of
segments, each segment a row-major product of factors. A factor is either an *atom* (an abstract
set of channels, identified by an int) or a `Broadcast` (a stretch along which the tensor does not
vary: what `expand`, `repeat_interleave` and GQA's `repeat_kv` produce).

    in_proj output rows of a Mamba2 mixer, after analysis:
        ((G, R, P), (G, R, P), (G, N), (G, N), (G, R))      # z | x | B | C | dt
    G: B/C groups, R: heads inside a group, P: head_dim, N: state

Atoms are merged with a union-find when op rules couple two dimensions (`unify`), and are
*refined* when a view or a slice shows their inner structure: an atom may become a product of
finer atoms (view [.., H*P] -> [.., H, P]) or a concatenation of finer atoms (split / slice).
Refinements are stored on the union-find root, so every dimension that shares the atom sees
them. The finest atoms at the end are the units the rest of graphprune prunes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from networkx.utils import UnionFind


class AxisError(Exception):
    """Two channel layouts cannot be reconciled (the op mixes channels in a way no slice keeps)."""


@dataclass(frozen=True)
class Broadcast:
    """A factor along which the tensor is constant (an expanded or repeated dimension).

    Broadcasts made by an op (`AxisStore.new_broadcast`) carry an id: when one meets an atom, the
    store remembers the pair, so that a rewrite can shrink the repeat count with the atom.
    """

    size: int
    uid: int | None = None


@dataclass(frozen=True)
class Concat:
    """A concatenated factor nested inside a product: (heads x [rotary half 1 | rotary half 2])."""

    parts: tuple[tuple["Factor", ...], ...]


Factor = int | Broadcast | Concat
Segment = tuple[Factor, ...]
Expr = tuple[Segment, ...]


@dataclass
class BroadcastPairing:
    """Atom `atom` met a broadcast: it varies where the other operand repeats one value.

    `outer` are the atoms that precede it in the same product (the groups it is balanced over):
    Mamba2 heads inside their B/C group, query heads inside their KV head.
    """

    atom: int
    outer: tuple[int, ...]


@dataclass
class AxisStore:
    """Atoms, their sizes, their union-find and their refinements."""

    sizes: list[int] = field(default_factory=list)
    origins: list[str] = field(default_factory=list)
    _uf: UnionFind = field(default_factory=UnionFind)
    _refinement: dict[int, Expr] = field(default_factory=dict)
    _tags: dict[int, set[str]] = field(default_factory=dict)
    pairings: list[BroadcastPairing] = field(default_factory=list)
    broadcast_partner: dict[int, int] = field(default_factory=dict)  # broadcast uid -> atom it met
    _same_broadcast: UnionFind = field(default_factory=UnionFind)   # broadcasts that met each other
    _next_broadcast: int = 0

    # --- atoms -------------------------------------------------------------------------------
    def new_atom(self, size: int, origin: str, tags: set[str] | None = None) -> int:
        atom = len(self.sizes)
        self.sizes.append(size)
        self.origins.append(origin)
        self._uf[atom]  # registers it as its own root
        if tags:
            self._tags[atom] = set(tags)
        return atom

    def new_broadcast(self, size: int) -> Broadcast:
        self._next_broadcast += 1
        return Broadcast(size, self._next_broadcast)

    def partner(self, broadcast: Broadcast) -> int | None:
        if broadcast.uid is None:
            return None
        atom = self.broadcast_partner.get(self._same_broadcast[broadcast.uid])
        return None if atom is None else self.find(atom)

    def _link_broadcasts(self, a: Broadcast, b: Broadcast) -> None:
        if a.uid is None or b.uid is None:
            return
        ra, rb = self._same_broadcast[a.uid], self._same_broadcast[b.uid]
        if ra == rb:
            return
        partners = [p for p in (self.broadcast_partner.pop(ra, None), self.broadcast_partner.pop(rb, None)) if p is not None]
        self._same_broadcast.union(ra, rb)
        if partners:
            self.broadcast_partner[self._same_broadcast[ra]] = partners[0]

    def find(self, atom: int) -> int:
        return self._uf[atom]

    def size(self, factor: Factor) -> int:
        if isinstance(factor, Broadcast):
            return factor.size
        if isinstance(factor, Concat):
            return self.expr_size(factor.parts)
        return self.sizes[factor]

    def tags(self, atom: int) -> set[str]:
        return self._tags.get(self.find(atom), set())

    def tag(self, atom: int, *tags: str) -> None:
        """Tag an atom; a refined atom passes the tags to every finer atom."""
        for finest in self.finest_atoms(atom):
            self._tags.setdefault(finest, set()).update(tags)

    def finest_atoms(self, atom: int) -> list[int]:
        return self.atoms_of(self.expand(atom))

    def atoms_of(self, expr: Expr) -> list[int]:
        """Every atom of an expression, nested concatenations included, in order."""
        atoms: list[int] = []
        for seg in expr:
            for f in seg:
                if isinstance(f, Concat):
                    atoms.extend(self.atoms_of(f.parts))
                elif not isinstance(f, Broadcast):
                    atoms.append(self.find(f))
        return atoms

    # --- normal form -------------------------------------------------------------------------
    def expand(self, atom: int) -> Expr:
        """The finest known expression of an atom."""
        root = self.find(atom)
        refinement = self._refinement.get(root)
        return ((root,),) if refinement is None else self.normalize(refinement)

    def normalize(self, expr: Expr) -> Expr:
        return tuple(seg for segment in expr for seg in self._normalize_segment(segment))

    def _normalize_segment(self, segment: Segment) -> list[Segment]:
        parts: list[Segment] = [()]
        for position, factor in enumerate(segment):
            if isinstance(factor, Broadcast):
                parts = [p + (factor,) for p in parts]
                continue
            sub = self.normalize(factor.parts) if isinstance(factor, Concat) else self.expand(factor)
            if len(sub) == 1:
                parts = [p + sub[0] for p in parts]
            elif position == 0:
                # concat(S1, S2) x Rest == concat(S1 x Rest, S2 x Rest): flat form for the outer factor
                parts = list(sub)
            else:
                parts = [p + (Concat(sub),) for p in parts]
        return parts

    def describe(self, expr: Expr) -> str:
        def factor(f: Factor) -> str:
            if isinstance(f, Broadcast):
                return f"bcast{f.size}"
            if isinstance(f, Concat):
                return f"[{self.describe(f.parts)}]"
            return f"a{self.find(f)}[{self.sizes[f]}]"

        return " | ".join("x".join(factor(f) for f in seg) or "1" for seg in expr)

    def expr_size(self, expr: Expr) -> int:
        return sum(self.segment_size(seg) for seg in expr)

    def segment_size(self, segment: Segment) -> int:
        return math.prod(self.size(f) for f in segment)

    # --- refinement --------------------------------------------------------------------------
    def _refine(self, atom: int, expr: Expr) -> list[int]:
        """Record that (unrefined) `atom` equals `expr` built of new atoms; return those atoms."""
        root = self.find(atom)
        assert root not in self._refinement, "refine only unrefined atoms"
        self._refinement[root] = expr
        inherited = self._tags.get(root)
        new_atoms = self.atoms_of(expr)
        if inherited:
            for new in new_atoms:
                self._tags.setdefault(new, set()).update(inherited)
        return new_atoms

    def _split_factor(self, factor: Factor, sizes: list[int], kind: str) -> Expr:
        """Split a factor into a product ('product') or a concatenation ('concat') of sizes."""
        if isinstance(factor, Broadcast):
            parts = tuple(Broadcast(s) for s in sizes)
            return (parts,) if kind == "product" else tuple((p,) for p in parts)
        if isinstance(factor, Concat):
            raise AxisError(f"cannot split the concatenated axis {self.describe(factor.parts)} into {sizes}")
        origin = self.origins[factor]
        atoms = tuple(self.new_atom(s, f"{origin}/{kind}{i}") for i, s in enumerate(sizes))
        expr: Expr = (atoms,) if kind == "product" else tuple((a,) for a in atoms)
        self._refine(factor, expr)
        return expr

    def cut(self, expr: Expr, positions: set[int]) -> Expr:
        """Refine so that every position in `positions` is a segment boundary."""
        expr = self.normalize(expr)
        out: list[Segment] = []
        start = 0
        for segment in expr:
            stop = start + self.segment_size(segment)
            inner_cuts = sorted(p - start for p in positions if start < p < stop)
            out.extend(self._cut_segment(segment, inner_cuts) if inner_cuts else [segment])
            start = stop
        return self.normalize(tuple(out))

    def _cut_segment(self, segment: Segment, cuts: list[int]) -> list[Segment]:
        head, rest = segment[0], segment[1:]
        inner = self.segment_size(rest)
        if any(c % inner for c in cuts):
            raise AxisError(
                f"cannot cut {self.describe((segment,))} at {cuts}: the cut falls inside a block of {inner}"
            )
        bounds = [0, *(c // inner for c in cuts), self.size(head)]
        pieces = self._split_factor(head, [b - a for a, b in zip(bounds, bounds[1:])], "concat")
        return [piece + rest for piece in pieces]

    def refine_strides(self, segment: Segment, strides: set[int]) -> Segment:
        """Refine a product so that each stride in `strides` falls on a factor boundary."""
        segment = self._single(self.normalize((segment,)))
        out: list[Factor] = []
        inner = self.segment_size(segment)
        for factor in segment:
            size = self.size(factor)
            inner //= size
            outer = inner * size
            cuts = sorted((s for s in strides if inner < s < outer), reverse=True)
            if not cuts:
                out.append(factor)
                continue
            bounds = [outer, *cuts, inner]
            if any(big % small for big, small in zip(bounds, bounds[1:])):
                raise AxisError(
                    f"cannot factor {self.describe((segment,))} at strides {sorted(strides)}: "
                    "the two layouts are not nested (no common refinement)"
                )
            sizes = [big // small for big, small in zip(bounds, bounds[1:])]
            out.extend(self._split_factor(factor, sizes, "product")[0])
        return tuple(out)

    def _single(self, expr: Expr) -> Segment:
        if len(expr) != 1:
            raise AxisError(f"expected one product, found a concatenation {self.describe(expr)}")
        return expr[0]

    # --- unification -------------------------------------------------------------------------
    def unify(self, a: Expr, b: Expr) -> Expr:
        """Make two layouts of one dimension the same channels; return the merged layout."""
        if self.expr_size(a) != self.expr_size(b):
            raise AxisError(f"size mismatch: {self.describe(a)} vs {self.describe(b)}")
        for _ in range(64):
            a, b = self.normalize(a), self.normalize(b)
            bounds = self._boundaries(a) | self._boundaries(b)
            if bounds != self._boundaries(a) or bounds != self._boundaries(b):
                a, b = self.cut(a, bounds), self.cut(b, bounds)
                continue
            refined = False
            for i, (sa, sb) in enumerate(zip(a, b)):
                strides = self._strides(sa) | self._strides(sb)
                if strides != self._strides(sa) or strides != self._strides(sb):
                    a = a[:i] + (self.refine_strides(sa, strides),) + a[i + 1 :]
                    b = b[:i] + (self.refine_strides(sb, strides),) + b[i + 1 :]
                    refined = True
                    break
            if refined:
                continue
            merged = tuple(self._unify_segment(sa, sb) for sa, sb in zip(a, b))
            return self.normalize(merged)
        raise AxisError(f"layouts did not converge: {self.describe(a)} vs {self.describe(b)}")

    def _unify_segment(self, sa: Segment, sb: Segment) -> Segment:
        out: list[Factor] = []
        for i, (fa, fb) in enumerate(zip(sa, sb)):
            a_bcast, b_bcast = isinstance(fa, Broadcast), isinstance(fb, Broadcast)
            if isinstance(fa, Concat) or isinstance(fb, Concat):
                if a_bcast or b_bcast:
                    raise AxisError(f"a broadcast meets the concatenated axis {self.describe((sa,))}")
                merged = self.unify(self._as_expr(fa), self._as_expr(fb))
                out.append(merged[0][0] if len(merged) == 1 and len(merged[0]) == 1 else Concat(merged))
            elif a_bcast and b_bcast:
                self._link_broadcasts(fa, fb)
                out.append(fa)
            elif a_bcast or b_bcast:
                atom, side = (fb, sb) if a_bcast else (fa, sa)
                broadcast = fa if a_bcast else fb
                outer = tuple(self.atoms_of((side[:i],)))
                self.pairings.append(BroadcastPairing(atom, outer))
                if broadcast.uid is not None:
                    self.broadcast_partner.setdefault(self._same_broadcast[broadcast.uid], atom)
                out.append(atom)
            else:
                out.append(self._union(fa, fb))
        return tuple(out)

    def _union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        ref_a, ref_b = self._refinement.pop(ra, None), self._refinement.pop(rb, None)
        tags = self._tags.pop(ra, set()) | self._tags.pop(rb, set())
        self._uf.union(ra, rb)
        root = self.find(ra)
        if tags:
            self._tags[root] = tags
        if ref_a is not None and ref_b is not None:
            self._refinement[root] = ref_a
            self.unify(ref_a, ref_b)
        elif ref_a is not None or ref_b is not None:
            self._refinement[root] = ref_a if ref_a is not None else ref_b
        if tags and root in self._refinement:
            self.tag(root, *tags)  # tags live on the finest atoms
        return root

    @staticmethod
    def _as_expr(factor: Factor) -> Expr:
        return factor.parts if isinstance(factor, Concat) else ((factor,),)

    def _boundaries(self, expr: Expr) -> set[int]:
        bounds, pos = set(), 0
        for seg in expr[:-1]:
            pos += self.segment_size(seg)
            bounds.add(pos)
        return bounds

    def _strides(self, segment: Segment) -> set[int]:
        strides, inner = set(), 1
        for factor in reversed(segment[1:]):
            inner *= self.size(factor)
            strides.add(inner)
        return strides
