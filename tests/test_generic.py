"""The generic graph path: a hand-written hybrid (no family adapter) pruned per group, as a rewritten graph."""

import pytest
import torch

from graphprune.apply import apply
from graphprune.planning import PlanError
from graphprune.spec import parse_spec
from models import hand_hybrid, logits

MAGNITUDE = {"hidden": "magnitude", "ffn": "magnitude", "mamba": "magnitude", "attention": "magnitude"}
IDS = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))  # the traced shape


def prune(tmp_path, groups, **targets):
    targets = {**targets, "identity": True} if not groups and not targets else targets
    spec = parse_spec({"model": {"path": "hand-hybrid"}, "importance": MAGNITUDE,
                       "targets": {"groups": groups, **targets}, "output": str(tmp_path / "out")})
    model = hand_hybrid()
    report = apply(spec, model=model, force=True)
    pruned = torch.export.load(tmp_path / "out" / "model.pt2").module()
    return report, pruned


def test_identity_graph_reproduces_logits(tmp_path):
    report, pruned = prune(tmp_path, {})
    assert torch.equal(pruned(IDS), logits(hand_hybrid(), IDS))


def test_ffn_and_attention_heads_slicing_equals_masking(tmp_path):
    report, pruned = prune(tmp_path, {"layers.1.ffn": 20, "layers.2.attention.heads": 2})
    reference = hand_hybrid()
    kept_ffn = report["groups"]["layers.1.ffn"]["kept"]
    kept_heads = report["groups"]["layers.2.attention.heads"]["kept"]
    assert len(kept_ffn) == 20 and len(kept_heads) == 2 and {h // 2 for h in kept_heads} == {0, 1}
    with torch.no_grad():
        down = reference.layers[1].mixer.down.weight
        down[:, [i for i in range(40) if i not in kept_ffn]] = 0
        o_proj = reference.layers[2].mixer.o_proj.weight.view(24, 4, 6)
        o_proj[:, [h for h in range(4) if h not in kept_heads]] = 0
    torch.testing.assert_close(pruned(IDS), logits(reference, IDS), rtol=1e-5, atol=1e-5)


def test_every_axis_at_once_runs_and_reloads(tmp_path):
    report, pruned = prune(tmp_path, {"hidden": 16, "layers.0.mamba.heads": 3, "layers.0.mamba.head_dim": 2,
                                      "layers.1.ffn": 20, "layers.2.attention.heads": 2})
    verify = next(p for p in report["passes"] if p["name"] == "verify")
    assert verify["max_abs_logit_diff"] == 0.0
    assert report["pruned"]["params"] == sum(p.numel() for p in pruned.parameters()) < report["original"]["params"]
    assert pruned(IDS).shape == (1, 16, 64)
    kept_heads = report["groups"]["layers.0.mamba.heads"]["kept"]
    assert [h // 2 for h in kept_heads] == [0, 1, 2]  # one head from each of the 3 B/C groups


def test_depth_needs_a_family(tmp_path):
    with pytest.raises(PlanError, match="family adapter"):
        prune(tmp_path, {}, num_layers=3)
