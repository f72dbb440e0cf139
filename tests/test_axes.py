"""The axis algebra on its own: unification with refinement, cuts, balance, nesting."""

import pytest

from graphprune.axes import AxisError, AxisStore, Broadcast, Concat


def atom(store, size, name="a"):
    return ((store.new_atom(size, name),),)


def test_factoring_meets_grouping_into_a_common_refinement():
    store = AxisStore()
    x = atom(store, 64)
    heads = store.refine_strides(x[0], {8})            # view as [8 heads, 8 head_dim]
    groups = store.refine_strides(store.normalize(x)[0], {32})  # view as [2 norm groups, 32]
    assert [store.size(f) for f in store.normalize(x)[0]] == [2, 4, 8]
    assert len(heads) == 2 and len(groups) == 3  # [2 groups, 4 heads per group, 8]


def test_heads_meeting_repeated_groups_become_balanced():
    store = AxisStore()
    heads = atom(store, 8)
    groups = store.new_atom(2, "g")
    merged = store.unify(heads, ((groups, Broadcast(4)),))   # B.repeat_interleave(4, dim=heads)
    (segment,) = merged
    assert store.find(segment[0]) == store.find(groups)
    (pairing,) = store.pairings
    assert store.find(pairing.atom) == store.find(segment[1]) and pairing.outer == (store.find(groups),)


def test_cut_splits_segments_and_unify_aligns_them():
    store = AxisStore()
    rows = atom(store, 20)
    parts = store.cut(rows, {8, 16})
    assert [store.segment_size(s) for s in parts] == [8, 8, 4]
    other = (atom(store, 8)[0], atom(store, 12)[0])
    merged = store.unify(rows, other)
    assert [store.segment_size(s) for s in merged] == [8, 8, 4]


def test_concatenation_inside_a_product_nests():
    store = AxisStore()
    q = atom(store, 4 * 6)                                 # heads x head_dim
    head_dim = store.refine_strides(q[0], {6})[1]
    store.cut(((head_dim,),), {3})                         # rotary halves
    (segment,) = store.normalize(q)
    assert isinstance(segment[1], Concat)
    halves = store.normalize(((head_dim,),))
    store.unify((halves[0],), (halves[1],))                # rotate_half couples the halves
    assert len(set(store.atoms_of(store.normalize(q)))) == 2


def test_layouts_without_common_refinement_are_refused():
    store = AxisStore()
    x = atom(store, 24)
    store.refine_strides(x[0], {4})                        # [6, 4]
    with pytest.raises(AxisError, match="not nested"):
        store.refine_strides(store.normalize(x)[0], {6})   # [4, 6]


def test_size_mismatch_is_refused():
    store = AxisStore()
    with pytest.raises(AxisError, match="size mismatch"):
        store.unify(atom(store, 4), atom(store, 5))
