"""The derived family: Hugging Face models without a family module, pruned into standard checkpoints.

Oracles: the keep-everything spec reproduces the logits exactly; the reloaded checkpoint (transformers'
own class, unpatched) equals the original model with the pruned units masked where masking is exact
(FFN neurons, attention heads, Mamba heads, removed layers) and, for every axis at once, equals the
original's traced graph with the same slices (the generic rewrite, itself checked against masking in
test_generic.py); the written families' configs come out byte-identical through the derived path.
"""

import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from checkpoints import llama_config, logits, mamba2_config, nemotron_h_config, original, write_checkpoint
from graphprune import analyze
from graphprune.apply import apply
from graphprune.errors import UserError
from graphprune.families import DerivedFamily
from graphprune.planning import kind_sizes, plan_sizes
from graphprune.rewrite import rewrite_graph
from graphprune.spec import TargetsSpec, parse_spec

MAGNITUDE = {"hidden": "magnitude", "ffn": "magnitude", "mamba": "magnitude", "attention": "magnitude",
             "depth": "random"}


def granite_config(**overrides):
    """A dense GraniteMoeHybrid (Mamba2 + attention, 3 B/C groups) with sizes that do not coincide."""
    from transformers import GraniteMoeHybridConfig

    return GraniteMoeHybridConfig(**{
        "vocab_size": 4096, "hidden_size": 48, "shared_intermediate_size": 40, "intermediate_size": 56,
        "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2, "num_local_experts": 0,
        "layer_types": ["mamba", "attention", "mamba", "mamba"], "mamba_n_heads": 12, "mamba_n_groups": 3,
        "mamba_d_state": 16, "mamba_d_head": 8, "mamba_expand": 2, "mamba_chunk_size": 16,
        "position_embedding_type": None, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "tie_word_embeddings": False, **overrides})


def phi3_config():
    """Phi-3: fused qkv_proj and gate_up_proj, head_dim derived as hidden // heads."""
    from transformers import Phi3Config

    return Phi3Config(vocab_size=4096, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)


# every width axis each model has, as per-kind targets
WIDTHS = {"granite": {"hidden_size": 24, "ffn_hidden_size": 24, "mamba_num_heads": 6, "mamba_head_dim": 4,
                      "num_attention_heads": 4},
          "phi3": {"hidden_size": 32, "ffn_hidden_size": 48, "num_attention_heads": 4}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("derived")
    return {"root": root, "granite": write_checkpoint(granite_config(), root / "granite"),
            "phi3": write_checkpoint(phi3_config(), root / "phi3")}


def run(workspace, model, targets, name):
    spec = parse_spec({"model": {"path": str(workspace[model])}, "importance": MAGNITUDE, "targets": targets,
                       "output": str(workspace["root"] / name), "reconstruct": None})
    report = apply(spec, force=True)
    return report, AutoModelForCausalLM.from_pretrained(workspace["root"] / name).eval()


def ids(n=2, length=32):
    return torch.randint(0, 4096, (n, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("model", ["granite", "phi3"])
def test_identity_spec_reproduces_logits_exactly(workspace, model):
    report, pruned = run(workspace, model, {"identity": True}, f"identity-{model}")
    assert report["pruned"]["params"] == report["original"]["params"]
    assert torch.equal(logits(pruned, ids()), logits(original(workspace, model), ids()))


@pytest.mark.parametrize("model", ["granite", "phi3"])
def test_every_width_axis_reloads_and_equals_the_sliced_graph(workspace, model):
    targets = WIDTHS[model]
    report, reloaded = run(workspace, model, targets, f"widths-{model}")
    assert type(reloaded).__module__.startswith("transformers.")  # transformers' own class, no patch
    assert reloaded.num_parameters() == report["pruned"]["params"] < report["original"]["params"]
    config = json.loads((workspace["root"] / f"widths-{model}" / "config.json").read_text())
    assert config["hidden_size"] == targets["hidden_size"]
    assert config["num_attention_heads"] == targets["num_attention_heads"]
    # the oracle: the original's traced graph with the same kept units (from the report)
    analysis = analyze(str(workspace[model]))
    plan = plan_sizes(analysis, TargetsSpec(**targets))
    plan.kept = {name: group["kept"] for name, group in report["groups"].items() if "kept" in group}
    state = {n: t for n, t in reloaded.state_dict().items()}
    graph = rewrite_graph(analysis, plan, _renamed_like(analysis, state))
    tokens = ids(1, analysis.family.trace_seq_len(analysis.model.config))
    with torch.no_grad():
        expected = graph(input_ids=tokens, use_cache=False)
    expected = expected.logits if hasattr(expected, "logits") else expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(logits(reloaded, tokens), expected, rtol=1e-4, atol=1e-4)


def _renamed_like(analysis, state):
    return {name: state[name] for name in analysis.model.state_dict() if name in state}


def test_granite_heads_and_ffn_slicing_equals_masking(workspace):
    report, reloaded = run(workspace, "granite", {"ffn_hidden_size": 24, "mamba_num_heads": 6,
                                                  "num_attention_heads": 4}, "mask-granite")
    reference = original(workspace, "granite")
    groups = report["groups"]
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            kept = groups[f"layers.{i}.ffn"]["kept"]
            layer.shared_mlp.output_linear.weight[:, [j for j in range(40) if j not in kept]] = 0
            if layer.mamba is not None:  # a masked head contributes nothing: zero its out_proj columns
                heads = groups[f"layers.{i}.mamba.heads"]["kept"]
                assert sorted({h // 4 for h in heads}) == [0, 1, 2]  # two heads kept in each B/C group
                _mask_gated_norm_heads(layer.mamba, heads)
            else:
                heads = groups[f"layers.{i}.attention.heads"]["kept"]
                o_proj = layer.self_attn.o_proj.weight.view(48, 6, 8)
                o_proj[:, [h for h in range(6) if h not in heads]] = 0
    torch.testing.assert_close(logits(reloaded, ids()), logits(reference, ids()), rtol=1e-4, atol=1e-4)


def _mask_gated_norm_heads(mamba, kept_heads):
    """Masking Mamba heads behind a grouped RMSNorm: zero the heads' out_proj columns and make the
    norm's per-group mean see only the kept channels (what slicing computes)."""
    head_dim, n_groups = mamba.head_dim, mamba.n_groups
    channels = torch.zeros(mamba.num_heads * head_dim, dtype=torch.bool)
    for h in kept_heads:
        channels[h * head_dim:(h + 1) * head_dim] = True
    mamba.out_proj.weight[:, ~channels] = 0
    norm = mamba.norm
    original_forward = norm.forward

    def forward(hidden_states, gate=None):
        dtype = hidden_states.dtype
        x = hidden_states.float()
        if gate is not None:
            x = x * nn.functional.silu(gate.float())
        *lead, width = x.shape
        grouped = x.view(*lead, n_groups, width // n_groups)
        mask = channels.view(n_groups, -1).to(x)
        variance = (grouped.pow(2) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True)
        x = (grouped * torch.rsqrt(variance + norm.variance_epsilon)).view(*lead, width)
        return norm.weight * x.to(dtype)
    norm.forward = forward
    assert original_forward is not None


def test_granite_depth_equals_skipping_the_layer(workspace):
    report, reloaded = run(workspace, "granite", {"num_layers": 3}, "depth-granite")
    dropped = report["dropped_layers"]
    assert len(dropped) == 1
    config = json.loads((workspace["root"] / "depth-granite" / "config.json").read_text())
    kinds = json.loads((workspace["granite"] / "config.json").read_text())["layer_types"]
    assert config["layer_types"] == [k for i, k in enumerate(kinds) if i not in dropped]
    reference = original(workspace, "granite")
    reference.model.layers[dropped[0]].forward = lambda hidden_states, *args, **kwargs: hidden_states
    torch.testing.assert_close(logits(reloaded, ids()), logits(reference, ids()), rtol=1e-4, atol=1e-4)


def test_phi3_fused_heads_and_ffn_slicing_equals_masking(workspace):
    report, reloaded = run(workspace, "phi3", {"ffn_hidden_size": 48, "num_attention_heads": 4,
                                               "num_layers": 2}, "mask-phi3")
    reference = original(workspace, "phi3")
    groups, dropped = report["groups"], report["dropped_layers"]
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            if i in dropped:
                layer.forward = lambda hidden_states, *args, **kwargs: hidden_states
                continue
            kept = groups[f"layers.{i}.ffn"]["kept"]
            layer.mlp.down_proj.weight[:, [j for j in range(80) if j not in kept]] = 0
            heads = groups[f"layers.{i}.attention.heads"]["kept"]
            assert sorted({h // 3 for h in heads}) == [0, 1]  # two query heads kept per KV head
            o_proj = layer.self_attn.o_proj.weight.view(48, 6, 8)
            o_proj[:, [h for h in range(6) if h not in heads]] = 0
    torch.testing.assert_close(logits(reloaded, ids()), logits(reference, ids()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("config,targets", [
    (nemotron_h_config(), {"hidden_size": 32, "ffn_hidden_size": 40, "mamba_num_heads": 4, "mamba_head_dim": 4,
                           "num_attention_heads": 2, "num_layers": 4}),
    (mamba2_config(), {"hidden_size": 16, "mamba_num_heads": 4, "num_layers": 1}),
    (llama_config(), {"hidden_size": 32, "ffn_hidden_size": 48, "num_attention_heads": 4, "num_layers": 1}),
], ids=["nemotron_h", "mamba2", "llama"])
def test_written_families_and_the_derived_path_write_the_same_config(config, targets):
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    analysis = analyze(model, meta=True)
    derived = DerivedFamily().bind(analysis.structure, analysis.model)
    plan = plan_sizes(analysis, TargetsSpec(**targets))
    kept = list(range(plan.sizes.get("layers", len(analysis.layers))))
    written = analysis.family.pruned_config(analysis.model.config, kind_sizes(analysis, plan.sizes), kept)
    found = derived.pruned_config(analysis.model.config, kind_sizes(analysis, plan.sizes), kept)
    assert found.to_json_string() == written.to_json_string()


def test_a_size_the_config_cannot_express_fails_before_calibration(tmp_path):
    # GPT-2 without n_inner sizes its MLP as 4 * n_embd: no key holds the FFN size on its own
    from transformers import GPT2Config

    folder = write_checkpoint(GPT2Config(vocab_size=4096, n_embd=48, n_layer=2, n_head=4, n_positions=64),
                              tmp_path / "gpt2")
    spec = parse_spec({"model": {"path": str(folder)}, "importance": {"ffn": "activation"},
                       "calibration": {"data": {"path": str(tmp_path / "missing.txt")}},
                       "targets": {"ffn_hidden_size": 96}, "output": str(tmp_path / "out")})
    with pytest.raises(UserError) as err:
        apply(spec, force=True)  # the calibration file does not exist: the error must come first
    message = str(err.value)
    assert "ffn groups (layers.0.ffn, layers.1.ffn)" in message and "config keys tried: " in message
    assert "n_embd" in message
    assert not (tmp_path / "out").exists()


def test_inspect_shows_the_derived_config_key_of_every_group(workspace):
    analysis = analyze(str(workspace["granite"]))
    assert isinstance(analysis.family, DerivedFamily)
    keys = {g.kind: g.config_key for g in analysis.groups if g.kind != "layer"}
    assert keys["hidden"] == "hidden_size" and keys["ffn"] == "shared_intermediate_size"
    assert keys["mamba_heads"] == "mamba_n_heads" and keys["mamba_head_dim"] == "mamba_d_head"
    assert keys["attention_heads"] == "num_attention_heads"
    described = analysis.to_dict()["config_keys"]  # what `inspect --json` prints
    assert described["mamba_heads"]["scaling"] == {"mamba_n_heads": 1, "mamba_expand": 1}
    assert described["hidden"]["scaling"] == {"hidden_size": 1, "mamba_expand": -1, "head_dim": 0}  # head_dim pinned
    assert set(described["layer"]["keys"]) == {"num_hidden_layers", "layer_types"}


def _cache_bytes(cache) -> int:
    """Bytes of every tensor transformers' generation cache holds (K/V, conv and recurrent states)."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from tensors(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from tensors(item)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in tensors(vars(layer)))


def test_search_dry_run_on_granite_counts_what_transformers_builds(workspace):
    from graphprune.planning import pruned_config
    from graphprune.search import plan_search

    full = original(workspace, "granite")
    seq_len, batch = 20, 2
    budget = 4 * full.num_parameters() + 10**6
    spec = parse_spec({"model": {"path": str(workspace["granite"])}, "output": "unused",
                       "search": {"memory_bytes": budget, "memory_seq_len": seq_len, "memory_batch": batch,
                                  "min_budget_fraction": 0.1, "max_candidates": 6,
                                  "space": {"hidden_size": {"values": [48, 24]}, "ffn_hidden_size": {"values": [40, 24]},
                                            "mamba_num_heads": {"values": [12, 6]}, "num_layers": {"values": [4, 3]}}}})
    report = plan_search(spec)
    analysis = analyze(str(workspace["granite"]))
    assert len(report["candidates"]) >= 4
    for candidate in report["candidates"]:
        plan = plan_sizes(analysis, TargetsSpec(**candidate["targets"]))
        dropped = list(range(candidate["targets"]["num_layers"], 4))  # a dry run drops the last layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(pruned_config(analysis, plan.sizes, dropped)).eval()
        assert model.num_parameters() == candidate["params"], candidate["targets"]
        with torch.no_grad():
            cache = model(input_ids=ids(1, seq_len), use_cache=True).past_key_values
        assert candidate["memory_bytes"] == 4 * model.num_parameters() + batch * _cache_bytes(cache), candidate["targets"]


class FusedViewAttention(nn.Module):
    """Multi-head attention whose fused qkv output is viewed as [B, L, 3, H, D] and unbound."""

    def __init__(self, width=24, heads=4):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(width, 3 * width), nn.Linear(width, width)

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).unbind(2)
        y = nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class FusedViewModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(64, 24), nn.Linear(24, 64)
        self.layers = nn.ModuleList([FusedViewAttention(), FusedViewAttention()])

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)


def test_a_fused_projection_viewed_as_3_heads_head_dim_prunes_heads(tmp_path):
    spec = parse_spec({"model": {"path": "fused-view"}, "importance": MAGNITUDE,
                       "targets": {"groups": {"layers.0.attention.heads": 2, "layers.1.attention.heads": 3}},
                       "output": str(tmp_path / "out")})
    report = apply(spec, model=FusedViewModel(), force=True)
    pruned = torch.export.load(tmp_path / "out" / "model.pt2").module()
    reference = FusedViewModel()
    with torch.no_grad():
        for i, layer in enumerate(reference.layers):  # a masked head: its columns of the output projection
            kept = report["groups"][f"layers.{i}.attention.heads"]["kept"]
            layer.out.weight.view(24, 4, 6)[:, [h for h in range(4) if h not in kept]] = 0
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens), reference(tokens), rtol=1e-5, atol=1e-5)
    assert report["pruned"]["params"] == sum(p.numel() for p in pruned.parameters()) < report["original"]["params"]
