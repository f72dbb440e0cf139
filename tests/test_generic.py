"""The generic graph path: a hand-written hybrid (no family adapter) pruned per group, as a rewritten graph."""

import pytest
import torch

from graphprune.analysis import conv_sources, propagate
from graphprune.apply import apply
from graphprune.groups import build_structure
from graphprune.planning import PlanError
from graphprune.spec import parse_spec
from graphprune.trace import symbolic_dims, trace
from models import hand_hybrid, logits

MAGNITUDE = {"hidden": "magnitude", "ffn": "magnitude", "mamba": "magnitude", "attention": "magnitude"}
IDS = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))


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


def test_saved_graph_runs_at_any_batch_and_length(tmp_path):
    """model.pt2 keeps a symbolic batch and sequence through the rewrite: at batches and lengths other than the
    traced (2, 16) it equals the original with the pruned units masked (zeroed, the norms averaging over the
    kept channels only, which is what the pruned norms compute)."""
    report, pruned = prune(tmp_path, {"hidden": 16, "layers.0.mamba.heads": 3, "layers.1.ffn": 20,
                                      "layers.2.attention.heads": 2})
    materialize = next(p for p in report["passes"] if p["name"] == "materialize")
    assert materialize["inputs"] == {"ids": ["dynamic", "dynamic"]}
    kept = {name: report["groups"][name]["kept"] for name in
            ("hidden", "layers.0.mamba.heads", "layers.1.ffn", "layers.2.attention.heads")}
    assert [h // 2 for h in kept["layers.0.mamba.heads"]] == [0, 1, 2]  # one head per B/C group: 4 channels each
    assert {h // 2 for h in kept["layers.2.attention.heads"]} == {0, 1}
    reference = hand_hybrid()
    dropped = {name: [i for i in range(size) if i not in kept[name]] for name, size in
               (("hidden", 24), ("layers.0.mamba.heads", 6), ("layers.1.ffn", 40), ("layers.2.attention.heads", 4))}
    with torch.no_grad():
        hidden = dropped["hidden"]
        reference.embed.weight[:, hidden] = 0  # the residual stream is zero on dropped channels ...
        for writer in (reference.layers[0].mixer.out_proj, reference.layers[1].mixer.down,
                       reference.layers[2].mixer.o_proj, reference.layers[3].mixer.down):
            writer.weight[hidden] = 0
            if writer.bias is not None:
                writer.bias[hidden] = 0
        for norm in (*(layer.norm for layer in reference.layers), reference.norm):
            norm.mean_over = 16  # ... and the norms average over the kept ones
        mamba = reference.layers[0].mixer
        mamba.in_proj.weight[:24].view(6, 4, 24)[dropped["layers.0.mamba.heads"]] = 0  # z = 0: y = 0
        mamba.mean_over = 4
        reference.layers[1].mixer.down.weight[:, dropped["layers.1.ffn"]] = 0
        reference.layers[2].mixer.o_proj.weight.view(24, 4, 6)[:, dropped["layers.2.attention.heads"]] = 0
    generator = torch.Generator().manual_seed(2)
    for batch in (1, 3):
        for length in (5, 23):
            ids = torch.randint(0, 64, (batch, length), generator=generator)
            got = pruned(ids)
            assert got.shape == (batch, length, 64)
            torch.testing.assert_close(got, logits(reference, ids), rtol=1e-5, atol=1e-5)


def test_symbolic_trace_finds_the_same_groups():
    """The generic path traces with a symbolic batch and sequence; the analysis reads the example sizes and
    finds what a trace at a fixed shape finds."""
    model = hand_hybrid()
    dynamic, static = trace(model), trace(model, dynamic=False)
    assert symbolic_dims(dynamic) == {"ids": [0, 1]} and symbolic_dims(static) == {}
    found = []
    for exported in (dynamic, static):
        structure = build_structure(propagate(exported), model)
        found.append(([g.to_dict(with_slices=True) for g in structure.groups], structure.param_slices,
                      conv_sources(exported)))
    assert found[0] == found[1]


class MergedView(torch.nn.Module):
    """A view that merges the sequence with the hidden channels: its pruned size is symbolic x kept."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
        self.head = torch.nn.Linear(8, 32, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        b, l, d = x.shape
        x = x.reshape(b, l * d).cumsum(0).reshape(b, l, d)
        return self.head(self.layers[0](x))


def test_view_merging_sequence_and_channels_stays_dynamic(tmp_path):
    torch.manual_seed(0)
    model = MergedView().eval()
    spec = parse_spec({"model": {"path": "merged-view"}, "importance": MAGNITUDE, "targets": {"groups": {"hidden": 6}},
                       "output": str(tmp_path / "out")})
    report = apply(spec, model=model, force=True)
    pruned = torch.export.load(tmp_path / "out" / "model.pt2").module()
    with torch.no_grad():
        model.embed.weight[:, [i for i in range(8) if i not in report["groups"]["hidden"]["kept"]]] = 0
    for shape in ((1, 5), (3, 11)):
        ids = torch.randint(0, 32, shape, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(pruned(ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_depth_needs_a_family(tmp_path):
    with pytest.raises(PlanError, match="needs a Hugging Face model"):
        prune(tmp_path, {}, num_layers=3)
