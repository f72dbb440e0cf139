"""The structure the analysis derives from the graph, for each family and a hand-written hybrid."""

import pytest

from graphprune import analyze
from models import hand_hybrid, tiny_llama, tiny_mamba2, tiny_nemotron_h


def kinds(analysis, kind):
    return analysis.groups_of_kind(kind)


def slice_params(group):
    return {(s.param, s.dim) for s in group.slices}


@pytest.fixture(scope="module")
def nemotron():
    return analyze(tiny_nemotron_h("M-M*-"))


def test_nemotron_h_mamba_heads_balanced_over_groups_with_state_fixed(nemotron):
    config = nemotron.model.config
    heads = kinds(nemotron, "mamba_heads")
    assert [g.name for g in heads] == ["layers.0.mamba.heads", "layers.2.mamba.heads"]
    for g in heads:
        assert g.size == config.mamba_num_heads
        assert g.balanced_groups == config.n_groups
        assert g.unit == config.mamba_head_dim
        assert g.fixed["n_groups"] == config.n_groups
        assert g.fixed["ssm_state"] == config.ssm_state_size
        assert g.fixed["conv_kernel"] == config.conv_kernel
        mixer = f"model.layers.{g.layer}.mixer"
        assert slice_params(g) == {(f"{mixer}.in_proj.weight", 0), (f"{mixer}.conv1d.weight", 0),
                                   (f"{mixer}.conv1d.bias", 0), (f"{mixer}.A_log", 0), (f"{mixer}.D", 0),
                                   (f"{mixer}.dt_bias", 0), (f"{mixer}.norm.weight", 0), (f"{mixer}.out_proj.weight", 1)}


def test_nemotron_h_in_proj_segments_z_x_B_C_dt(nemotron):
    config = nemotron.model.config
    inner = config.mamba_num_heads * config.mamba_head_dim
    bc = config.n_groups * config.ssm_state_size
    heads = nemotron.group("layers.0.mamba.heads")
    in_proj = [s for s in heads.slices if s.param.endswith("in_proj.weight")]
    # heads own z, x and dt; B and C (between x and dt) belong to no prunable group
    assert [(s.start, s.stop) for s in in_proj] == [(0, inner), (inner, 2 * inner),
                                                    (2 * inner + 2 * bc, 2 * inner + 2 * bc + config.mamba_num_heads)]
    z_layout = [(f.name, f.size, f.fixed) for f in in_proj[0].layout]
    assert z_layout == [("layers.0.mamba.n_groups", 2, True), ("layers.0.mamba.heads", 4, False),
                        ("layers.0.mamba.head_dim", config.mamba_head_dim, False)]
    groups_owning_bc = [g.name for g in nemotron.groups if g.kind != "hidden" and any(
        s.param.endswith("layers.0.mixer.in_proj.weight") and s.start < 2 * inner + 2 * bc and s.stop > 2 * inner
        for s in g.slices)]
    assert groups_owning_bc == []


def test_nemotron_h_one_head_dim_group_per_mamba_layer_shared_by_all_heads(nemotron):
    head_dims = kinds(nemotron, "mamba_head_dim")
    assert [g.name for g in head_dims] == ["layers.0.mamba.head_dim", "layers.2.mamba.head_dim"]
    for g in head_dims:
        assert g.size == nemotron.model.config.mamba_head_dim and g.balanced_groups == 1
        for s in g.slices:  # head_dim is the innermost factor after the heads: same channels in every head
            names = [f.name for f in s.layout]
            assert names[-1] == g.name and names[-2] == f"layers.{g.layer}.mamba.heads"


def test_nemotron_h_query_heads_balanced_over_kv_heads(nemotron):
    config = nemotron.model.config
    (heads,) = kinds(nemotron, "attention_heads")
    assert heads.name == "layers.3.attention.heads"
    assert (heads.size, heads.balanced_groups, heads.unit) == (config.num_attention_heads, config.num_key_value_heads, config.head_dim)
    assert heads.fixed == {"kv_heads": config.num_key_value_heads}
    mixer = "model.layers.3.mixer"
    assert slice_params(heads) == {(f"{mixer}.q_proj.weight", 0), (f"{mixer}.o_proj.weight", 1)}
    head_dims = {g.name: g for g in kinds(nemotron, "attention_head_dim")}
    assert set(head_dims) == {"layers.3.attention.head_dim", "layers.3.attention.v_head_dim"}
    assert slice_params(head_dims["layers.3.attention.head_dim"]) == {(f"{mixer}.q_proj.weight", 0), (f"{mixer}.k_proj.weight", 0)}


def test_nemotron_h_one_hidden_group_spans_the_residual_stream(nemotron):
    (hidden,) = kinds(nemotron, "hidden")
    assert hidden.name == "hidden" and hidden.size == nemotron.model.config.hidden_size
    owned = slice_params(hidden)
    model = nemotron.model
    expected = {("model.embeddings.weight", 1), ("model.norm_f.weight", 0), ("lm_head.weight", 1)}
    for i, layer in enumerate(model.model.layers):
        expected.add((f"model.layers.{i}.norm.weight", 0))
        for name, param in layer.mixer.named_parameters():
            if name.endswith(("in_proj.weight", "up_proj.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight")):
                expected.add((f"model.layers.{i}.mixer.{name}", 1))
            if name.endswith(("out_proj.weight", "down_proj.weight", "o_proj.weight")):
                expected.add((f"model.layers.{i}.mixer.{name}", 0))
    assert owned == expected


def test_nemotron_h_layers_and_ffn(nemotron):
    assert [(l.index, l.kind) for l in nemotron.layers] == [(0, "mamba"), (1, "mlp"), (2, "mamba"), (3, "attention"), (4, "mlp")]
    assert [g.name for g in kinds(nemotron, "ffn")] == ["layers.1.ffn", "layers.4.ffn"]
    assert all(g.size == nemotron.model.config.intermediate_size for g in kinds(nemotron, "ffn"))
    depth = nemotron.group("layers")
    assert depth.kind == "layer" and depth.size == 5


def test_params_total_matches_transformers(nemotron):
    assert nemotron.params == nemotron.model.num_parameters()


def test_llama_gqa_and_rotary_pairs():
    analysis = analyze(tiny_llama())
    config = analysis.model.config
    heads = kinds(analysis, "attention_heads")
    assert len(heads) == config.num_hidden_layers
    for g in heads:
        assert (g.size, g.balanced_groups, g.unit) == (6, 2, 8)
    # RoPE: the head_dim is two rotary halves sharing one frequency table, for every layer at once
    head_dim = analysis.group("attention.head_dim")
    assert head_dim.layer is None and head_dim.size == config.head_dim // 2
    assert ("model.rotary_emb.inv_freq", 0) in slice_params(head_dim)
    assert [g.name for g in kinds(analysis, "ffn")] == ["layers.0.ffn", "layers.1.ffn"]
    assert analysis.family.name == "llama"
    assert not kinds(analysis, "other")


def test_mamba2_family():
    analysis = analyze(tiny_mamba2())
    config = analysis.model.config
    heads = kinds(analysis, "mamba_heads")
    assert len(heads) == 2
    for g in heads:
        assert (g.size, g.balanced_groups, g.unit) == (config.num_heads, config.n_groups, config.head_dim)
        assert g.fixed["ssm_state"] == config.state_size
        assert g.config_key == "num_heads"
    assert [l.kind for l in analysis.layers] == ["mamba", "mamba"]


def test_hand_written_hybrid_without_transformers():
    model = hand_hybrid()
    analysis = analyze(model)
    assert analysis.family is None
    assert [l.kind for l in analysis.layers] == ["mamba", "mlp", "attention", "mlp"]
    (mamba_heads,) = kinds(analysis, "mamba_heads")
    mixer = model.layers[0].mixer
    assert (mamba_heads.size, mamba_heads.balanced_groups, mamba_heads.unit) == (mixer.h, mixer.g, mixer.p)
    assert mamba_heads.fixed["ssm_state"] == mixer.n and mamba_heads.fixed["n_groups"] == mixer.g
    (mamba_head_dim,) = kinds(analysis, "mamba_head_dim")
    assert mamba_head_dim.size == mixer.p
    (attention,) = kinds(analysis, "attention_heads")
    attn = model.layers[2].mixer
    assert (attention.size, attention.balanced_groups, attention.unit) == (attn.h, attn.kv, attn.hd)
    assert [g.size for g in kinds(analysis, "ffn")] == [40, 40]
    (hidden,) = kinds(analysis, "hidden")
    expected = {("embed.weight", 1), ("norm.weight", 0), ("head.weight", 1),
                ("layers.0.mixer.in_proj.weight", 1), ("layers.0.mixer.out_proj.weight", 0),
                ("layers.2.mixer.q_proj.weight", 1), ("layers.2.mixer.k_proj.weight", 1),
                ("layers.2.mixer.v_proj.weight", 1), ("layers.2.mixer.o_proj.weight", 0)}
    expected |= {(f"layers.{i}.norm.weight", 0) for i in range(4)}
    expected |= {(f"layers.{i}.mixer.{name}", dim) for i in (1, 3)
                 for name, dim in (("up.weight", 1), ("down.weight", 0), ("down.bias", 0))}
    assert slice_params(hidden) == expected
    assert not kinds(analysis, "other")


def test_8b_architecture_on_meta():
    analysis = analyze("specs/models/nemotron-h-8b.json")
    assert analysis.params == 8_100_852_736
    assert next(analysis.model.parameters()).device.type == "meta"
    pattern = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
    kind_of = {"M": "mamba", "-": "mlp", "*": "attention"}
    assert [l.kind for l in analysis.layers] == [kind_of[c] for c in pattern]
    mamba = kinds(analysis, "mamba_heads")
    assert len(mamba) == 24
    assert {(g.size, g.balanced_groups, g.unit, g.fixed["ssm_state"]) for g in mamba} == {(128, 8, 64, 128)}
    assert {(g.size, g.balanced_groups, g.unit) for g in kinds(analysis, "attention_heads")} == {(32, 8, 128)}
    assert {g.size for g in kinds(analysis, "ffn")} == {21504}
    assert analysis.group("hidden").size == 4096
