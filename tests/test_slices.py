"""The parameter slices of every group are exact: reordering a group's units in all of its slices
(a function-preserving rewrite when, and only when, the slices are complete and correct) leaves the
logits unchanged, while reordering only part of them changes the logits."""

import random

import pytest
import torch

from graphprune import analyze
from graphprune.slicing import permute_group, slice_indices
from models import hand_hybrid, logits, tiny_llama, tiny_mamba2, tiny_nemotron_h

MODELS = {"nemotron_h": lambda: tiny_nemotron_h("M-M*-"), "llama": tiny_llama, "mamba2": tiny_mamba2,
          "hand_hybrid": hand_hybrid}


def balanced_permutation(group, rng: random.Random) -> list[int]:
    """Shuffle units inside each balanced group (a head never leaves its B/C group or KV head)."""
    per_group = group.size // group.balanced_groups
    order = []
    for g in range(group.balanced_groups):
        units = list(range(g * per_group, (g + 1) * per_group))
        rng.shuffle(units)
        order.extend(units)
    return order


@pytest.mark.parametrize("family", MODELS)
def test_permuting_every_group_preserves_logits(family):
    model = MODELS[family]()
    analysis = analyze(model)
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    reference = logits(model, ids)
    rng = random.Random(0)
    prunable = [g for g in analysis.groups if g.kind != "layer"]
    assert len(prunable) >= 3
    for group in prunable:
        order = balanced_permutation(group, rng)
        assert order != sorted(order)
        permute_group(model, group, order)
        torch.testing.assert_close(logits(model, ids), reference, rtol=1e-4, atol=1e-4, msg=f"group {group.name}")


def test_partial_permutation_is_detected():
    """The oracle has teeth: leaving out one slice of a group changes the output."""
    model = tiny_nemotron_h("M-")
    analysis = analyze(model)
    group = analysis.group("layers.0.mamba.heads")
    ids = torch.randint(0, 64, (1, 32), generator=torch.Generator().manual_seed(1))
    reference = logits(model, ids)
    group.slices = [s for s in group.slices if not s.param.endswith("A_log")]
    permute_group(model, group, balanced_permutation(group, random.Random(0)))
    assert not torch.allclose(logits(model, ids), reference, atol=1e-3)


def test_slice_indices_keep_heads_per_group():
    analysis = analyze(tiny_nemotron_h("M-"))
    heads = analysis.group("layers.0.mamba.heads")  # 8 heads in 2 groups of 4, head_dim 6
    dt = next(s for s in heads.slices if s.param.endswith("in_proj.weight") and s.stop - s.start == 8)
    kept = slice_indices(dt, {heads.name: [1, 3, 4, 6]}, {heads.name: 8})
    assert kept == [dt.start + i for i in (1, 3, 4, 6)]
    x = next(s for s in heads.slices if s.param.endswith("out_proj.weight"))
    head_dim = analysis.group("layers.0.mamba.head_dim")
    kept = slice_indices(x, {heads.name: [1, 4], head_dim.name: [0, 5]}, {heads.name: 8, head_dim.name: 6})
    assert kept == [6, 11, 24, 29]
