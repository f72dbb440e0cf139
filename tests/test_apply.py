"""`graphprune apply`: identity, slice == mask, reload, group-aware Mamba pruning, errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from checkpoints import llama_config, logits, mamba2_config, nemotron_h_config, original, write_checkpoint, write_text
from graphprune import analyze
from graphprune.apply import apply
from graphprune.importance import magnitude_scores
from graphprune.importance import _skip_layer
from graphprune.spec import parse_spec


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("apply")
    return {"root": root, "text": write_text(root / "text.txt"),
            "nemotron": write_checkpoint(nemotron_h_config(), root / "nemotron"),
            "mamba2": write_checkpoint(mamba2_config(), root / "mamba2"),
            "llama": write_checkpoint(llama_config(), root / "llama"),
            "llama_tied": write_checkpoint(llama_config(tied=True), root / "llama_tied")}


def run(workspace, model, targets, name, **extra):
    spec = {"model": {"path": str(workspace[model])},
            "calibration": {"data": {"path": str(workspace["text"])}, "num_samples": 8, "seq_len": 64},
            "targets": targets, "output": str(workspace["root"] / name),
            "reconstruct": None, **extra}  # the masking oracles compare the cut itself
    report = apply(parse_spec(spec), force=True)
    return report, AutoModelForCausalLM.from_pretrained(workspace["root"] / name).eval()


def ids(n=2, length=48):
    return torch.randint(0, 4096, (n, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("model", ["nemotron", "mamba2", "llama"])
def test_identity_spec_reproduces_logits_exactly(workspace, model):
    report, pruned = run(workspace, model, {"identity": True}, f"identity-{model}")
    assert report["pruned"]["params"] == report["original"]["params"]
    assert torch.equal(logits(pruned, ids()), logits(original(workspace, model), ids()))


@pytest.mark.parametrize("model,targets", [
    ("nemotron", {"hidden_size": 32, "ffn_hidden_size": 40, "mamba_num_heads": 4, "mamba_head_dim": 4}),
    ("mamba2", {"mamba_num_heads": 4}),
    ("llama", {"hidden_size": 32, "ffn_hidden_size": 48, "num_attention_heads": 4, "num_layers": 1}),
    ("llama_tied", {"hidden_size": 36, "ffn_hidden_size": 48}),
])
def test_written_checkpoint_reloads_in_transformers_and_matches(workspace, model, targets):
    report, reloaded = run(workspace, model, targets, f"reload-{model}")
    verify = next(p for p in report["passes"] if p["name"] == "verify")
    assert verify["max_abs_logit_diff"] <= 1e-4
    assert reloaded.num_parameters() == report["pruned"]["params"] < report["original"]["params"]
    config = json.loads((workspace["root"] / f"reload-{model}" / "config.json").read_text())
    for key, value in report["pruned"]["config"].items():
        if key in config:
            assert config[key] == value, key


def test_replanning_reuses_cached_scores(workspace):
    first, _ = run(workspace, "nemotron", {"ffn_hidden_size": 64}, "replan")
    second, _ = run(workspace, "nemotron", {"ffn_hidden_size": 48}, "replan")
    sources = [next(p for p in r["passes"] if p["name"] == "calibrate")["source"] for r in (first, second)]
    assert sources == ["8 samples", "cache"]
    assert set(second["groups"]["layers.1.ffn"]["kept"]) <= set(first["groups"]["layers.1.ffn"]["kept"])


def test_ffn_slicing_equals_masking(workspace):
    report, pruned = run(workspace, "nemotron", {"ffn_hidden_size": 48}, "mask-ffn")
    reference = original(workspace, "nemotron")
    with torch.no_grad():
        for layer in (1, 4):
            kept = report["groups"][f"layers.{layer}.ffn"]["kept"]
            assert len(kept) == 48
            mask = torch.ones(80, dtype=torch.bool)
            mask[kept] = False
            reference.model.layers[layer].mixer.up_proj.weight[mask] = 0
    torch.testing.assert_close(logits(pruned, ids()), logits(reference, ids()), rtol=1e-5, atol=1e-5)


def test_attention_head_slicing_equals_masking(workspace):
    report, pruned = run(workspace, "nemotron", {"num_attention_heads": 2}, "mask-heads")
    kept = report["groups"]["layers.3.attention.heads"]["kept"]
    assert len(kept) == 2 and {h // 2 for h in kept} == {0, 1}  # one query head per KV head
    reference = original(workspace, "nemotron")
    with torch.no_grad():
        o_proj = reference.model.layers[3].mixer.o_proj.weight.view(48, 4, 12)
        for head in set(range(4)) - set(kept):
            o_proj[:, head] = 0
    torch.testing.assert_close(logits(pruned, ids()), logits(reference, ids()), rtol=1e-5, atol=1e-5)


def masked_gated_norm(norm, channel_mask, groups):
    """The gated group RMSNorm of the original mixer, with pruned channels zeroed and left out of the mean."""
    def forward(hidden_states, gate=None):
        h = hidden_states.float() * F.silu(gate.float()) * channel_mask
        grouped = h.view(*h.shape[:-1], groups, -1)
        kept = channel_mask.view(groups, -1).sum(-1, keepdim=True)
        variance = grouped.pow(2).sum(-1, keepdim=True) / kept
        out = (grouped * torch.rsqrt(variance + norm.variance_epsilon)).view_as(h)
        return norm.weight * out.to(hidden_states.dtype)
    return forward


def test_mamba_head_slicing_equals_masking_with_groups_intact(workspace):
    report, pruned = run(workspace, "nemotron", {"mamba_num_heads": 4}, "mask-mamba")
    reference = original(workspace, "nemotron")
    config = reference.config
    for layer in (0, 2):
        kept = report["groups"][f"layers.{layer}.mamba.heads"]["kept"]
        per_group = config.mamba_num_heads // config.n_groups
        assert [sum(1 for h in kept if h // per_group == g) for g in range(config.n_groups)] == [2, 2]
        mask = torch.zeros(config.mamba_num_heads, config.mamba_head_dim)
        mask[kept] = 1
        mixer = reference.model.layers[layer].mixer
        mixer.norm.forward = masked_gated_norm(mixer.norm, mask.flatten(), config.n_groups)
        # B, C, state and group count are untouched in the pruned layer
        pruned_mixer = pruned.model.layers[layer].mixer
        assert pruned_mixer.n_groups == config.n_groups and pruned_mixer.ssm_state_size == config.ssm_state_size
        bc = 2 * config.n_groups * config.ssm_state_size
        assert pruned_mixer.in_proj.weight.shape[0] == 2 * 4 * config.mamba_head_dim + bc + 4
        inner = config.mamba_num_heads * config.mamba_head_dim
        torch.testing.assert_close(pruned_mixer.in_proj.weight[48:48 + bc],
                                   mixer.in_proj.weight[2 * inner:2 * inner + bc])
    torch.testing.assert_close(logits(pruned, ids()), logits(reference, ids()), rtol=1e-4, atol=1e-5)


def test_dropping_a_layer_equals_skipping_it(workspace):
    report, pruned = run(workspace, "nemotron", {"num_layers": 4}, "mask-depth",
                         importance={"depth": "cosine"})
    (dropped,) = report["dropped_layers"]
    reference = original(workspace, "nemotron")
    reference.model.layers[dropped].register_forward_hook(_skip_layer, with_kwargs=True)
    assert pruned.config.num_hidden_layers == 4
    torch.testing.assert_close(logits(pruned, ids()), logits(reference, ids()), rtol=1e-5, atol=1e-5)


def test_head_dim_is_pruned_identically_in_every_head(workspace):
    report, pruned = run(workspace, "nemotron", {"mamba_head_dim": 4}, "head-dim")
    reference = original(workspace, "nemotron")
    kept = report["groups"]["layers.0.mamba.head_dim"]["kept"]
    x_rows = reference.model.layers[0].mixer.out_proj.weight.view(48, 8, 6)[:, :, kept].reshape(48, -1)
    torch.testing.assert_close(pruned.model.layers[0].mixer.out_proj.weight, x_rows)


def test_group_unaware_baseline_ranks_heads_globally(workspace):
    aware, _ = run(workspace, "nemotron", {"mamba_num_heads": 4}, "aware", importance={"mamba": "magnitude"})
    naive, _ = run(workspace, "nemotron", {"mamba_num_heads": 4}, "naive",
                   importance={"mamba": "magnitude", "group_aware": False})
    analysis = analyze(str(workspace["nemotron"]))
    scores = magnitude_scores(analysis.model, analysis.group("layers.0.mamba.heads"))
    best_in_group = [sorted((g * 4 + torch.topk(scores[g * 4:(g + 1) * 4], 2).indices).tolist()) for g in (0, 1)]
    assert aware["groups"]["layers.0.mamba.heads"]["kept"] == best_in_group[0] + best_in_group[1]
    # the naive baseline: the best heads overall in rank order, refilling group 0 then group 1
    assert naive["groups"]["layers.0.mamba.heads"]["kept"] == torch.topk(scores, 4).indices.tolist()


def test_params_budget_gives_a_feasible_model_under_budget(workspace):
    budget = 300_000
    report, pruned = run(workspace, "nemotron", {"params": budget}, "budget")
    assert report["pruned"]["params"] <= budget
    assert pruned.num_parameters() == report["pruned"]["params"]
    assert pruned.config.mamba_num_heads % pruned.config.n_groups == 0
