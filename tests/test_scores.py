"""The cost-aware importance scores (taylor, removal): their aggregation, and that they keep planted units."""

import pytest
import torch
import torch.nn.functional as F

from checkpoints import llama_config, nemotron_h_config, write_checkpoint, write_text
from graphprune import analyze
from graphprune.apply import apply
from graphprune.importance import collect_removal, collect_taylor, mask_sites
from graphprune.slicing import unit_labels
from graphprune.spec import parse_spec
from models import tiny_llama


def batches(n=4, length=24, vocab=96):
    ids = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1))
    return list(ids.split(2))


def head_groups(analysis):
    return {g.name: (g, mask_sites(analysis, g)) for g in analysis.groups_of_kind("attention_heads")}


def masked_logits(model, layer, masks: torch.Tensor, ids):
    """Logits with o_proj's input of `layer` multiplied per head by `masks` [heads] (a differentiable mask)."""
    o_proj = model.model.layers[layer].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(
        lambda m, args: (args[0] * masks.repeat_interleave(args[0].shape[-1] // len(masks)),))
    try:
        return model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()


def test_taylor_is_the_fisher_information_of_a_head_mask():
    model = tiny_llama()
    analysis = analyze(model)
    groups = head_groups(analysis)
    scores = collect_taylor(model, groups, batches())
    for layer in range(2):
        expected = torch.zeros(6)
        for batch in batches():
            for sequence in batch:
                masks = torch.ones(6, requires_grad=True)
                logits = masked_logits(model, layer, masks, sequence[None])
                loss = F.cross_entropy(logits[0, :-1], sequence[1:], reduction="sum")
                expected += torch.autograd.grad(loss, masks)[0].pow(2)
        torch.testing.assert_close(scores[f"layers.{layer}.attention.heads"], expected, rtol=1e-4, atol=1e-7)
    assert all(p.requires_grad for p in model.parameters())  # weights are unfrozen again


def test_removal_is_the_kl_of_the_masked_model_and_replaying_earlier_layers_changes_nothing():
    model = tiny_llama()
    analysis = analyze(model)
    layers = [model.get_submodule(layer.module) for layer in analysis.layers]
    scores = collect_removal(model, layers, head_groups(analysis), batches())
    with torch.no_grad():
        for layer, head in ((0, 2), (1, 5)):
            expected = 0.0
            for batch in batches():
                reference = F.log_softmax(model(input_ids=batch, use_cache=False).logits, -1).flatten(0, 1)
                masks = torch.ones(6)
                masks[head] = 0
                masked = F.log_softmax(masked_logits(model, layer, masks, batch), -1).flatten(0, 1)
                expected += F.kl_div(masked, reference, log_target=True, reduction="batchmean").item()
            assert scores[f"layers.{layer}.attention.heads"][head].item() == pytest.approx(expected / 2, rel=1e-4)


def test_mask_sites_are_where_a_unit_is_read():
    analysis = analyze(tiny_llama())
    by_kind = {g.kind: mask_sites(analysis, g) for g in analysis.groups if g.layer in (0, None)}
    assert [s.module for s in by_kind["attention_heads"]] == ["model.layers.0.self_attn.o_proj"]
    assert [s.module for s in by_kind["ffn"]] == ["model.layers.0.mlp.down_proj"]
    assert all(s.use_input for kind in ("attention_heads", "ffn") for s in by_kind[kind])
    assert {s.module for s in by_kind["hidden"]} >= {"model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm"}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A Llama with dead heads (zero o_proj columns) and loud dead FFN neurons (large activations, zero
    down_proj columns): removing them costs nothing, removing any other unit does."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("planted")
    folder = write_checkpoint(llama_config(), root / "model")
    model = AutoModelForCausalLM.from_pretrained(folder)
    dead_heads, dead_neurons = [1, 3], list(range(0, 80, 4))   # one query head per KV group; 20 of 80 neurons
    with torch.no_grad():
        for layer in model.model.layers:
            o_proj = layer.self_attn.o_proj.weight.view(48, 6, 8)
            o_proj[:, dead_heads] = 0
            mlp = layer.mlp
            mlp.down_proj.weight[:, dead_neurons] = 0
            mlp.gate_proj.weight[dead_neurons] *= 10
            mlp.up_proj.weight[dead_neurons] *= 10
    model.save_pretrained(folder)
    return {"model": folder, "text": write_text(root / "text.txt"), "root": root,
            "dead_heads": dead_heads, "dead_neurons": dead_neurons}


def prune_planted(planted, importance, targets, name):
    spec = parse_spec({"model": {"path": str(planted["model"])},
                       "calibration": {"data": {"path": str(planted["text"])}, "num_samples": 4, "seq_len": 32,
                                       "batch_size": 2},
                       "importance": importance, "targets": targets, "output": str(planted["root"] / name)})
    return apply(spec, force=True)["groups"]


@pytest.mark.parametrize("method", ["taylor", "removal"])
def test_cost_aware_scores_remove_the_planted_dead_heads(planted, method):
    groups = prune_planted(planted, {"attention": method}, {"num_attention_heads": 4}, f"heads-{method}")
    for layer in range(2):
        kept = groups[f"layers.{layer}.attention.heads"]["kept"]
        assert sorted(set(range(6)) - set(kept)) == planted["dead_heads"]


def test_activation_scores_keep_loud_dead_neurons(planted):
    """Why the cost-aware scores exist: an activation score cannot see the weights that read the unit."""
    groups = prune_planted(planted, {"ffn": "activation"}, {"ffn_hidden_size": 60}, "ffn-activation")
    assert set(planted["dead_neurons"]) <= set(groups["layers.0.ffn"]["kept"])


def test_taylor_removes_the_planted_dead_neurons(planted):
    groups = prune_planted(planted, {"ffn": "taylor"}, {"ffn_hidden_size": 60}, "ffn-taylor")
    for layer in range(2):
        assert sorted(set(range(80)) - set(groups[f"layers.{layer}.ffn"]["kept"])) == planted["dead_neurons"]


def test_taylor_and_removal_prune_a_hybrid_and_the_checkpoint_reloads(tmp_path):
    folder = write_checkpoint(nemotron_h_config(), tmp_path / "model")
    text = write_text(tmp_path / "text.txt")
    for method in ("taylor", "removal"):
        spec = parse_spec({"model": {"path": str(folder)},
                           "calibration": {"data": {"path": str(text)}, "num_samples": 2, "seq_len": 32},
                           "importance": {"mamba": method, "attention": method},
                           "targets": {"mamba_num_heads": 4, "num_attention_heads": 2}, "output": str(tmp_path / method)})
        report = apply(spec, force=True)
        verify = next(p for p in report["passes"] if p["name"] == "verify")
        assert verify["max_abs_logit_diff"] <= 1e-4
        heads = report["groups"]["layers.0.mamba.heads"]["kept"]
        assert len(heads) == 4 and sorted(h // 4 for h in heads) == [0, 0, 1, 1]  # two per B/C group


def test_unit_labels_map_o_proj_columns_to_heads_in_model_order():
    analysis = analyze(tiny_llama())
    site = mask_sites(analysis, analysis.group("layers.0.attention.heads"))[0]
    assert unit_labels(site.piece, "layers.0.attention.heads", 6).tolist() == [h for h in range(6) for _ in range(8)]


def test_removal_on_an_axis_of_many_units_is_refused_before_anything_runs(tmp_path):
    from graphprune.planning import PlanError

    folder = write_checkpoint(llama_config(), tmp_path / "model")
    spec = parse_spec({"model": {"path": str(folder)}, "importance": {"ffn": "removal"},
                       "targets": {"ffn_hidden_size": 40}})
    with pytest.raises(PlanError, match="importance.ffn: 'removal' scores heads.*use 'taylor'"):
        apply(spec, dry_run=True)


@pytest.mark.parametrize("make", ["llama", "nemotron_h"])
def test_kl_depth_score_with_replayed_layers_equals_removing_each_layer(make):
    from graphprune.importance import _skip_layer, depth_scores
    from models import tiny_nemotron_h

    model = tiny_llama() if make == "llama" else tiny_nemotron_h()
    analysis = analyze(model)
    layers = [model.get_submodule(layer.module) for layer in analysis.layers]
    scores = depth_scores(model, layers, batches(), "kl_removal")
    with torch.no_grad():
        for i, layer in enumerate(layers):
            expected = 0.0
            for batch in batches():
                reference = F.log_softmax(model(input_ids=batch, use_cache=False).logits, -1).flatten(0, 1)
                handle = layer.register_forward_hook(_skip_layer, with_kwargs=True)
                removed = F.log_softmax(model(input_ids=batch, use_cache=False).logits, -1).flatten(0, 1)
                handle.remove()
                expected += F.kl_div(removed, reference, log_target=True, reduction="batchmean").item()
            assert scores[i].item() == pytest.approx(expected / 2, rel=1e-4, abs=1e-7)
    assert all("forward" not in vars(layer) for layer in layers)  # the replay left no patched forward behind
