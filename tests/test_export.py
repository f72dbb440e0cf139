"""Export (hf, onnx, trtllm), the stateful prefill/decode reference, `graphprune bench`, and apply's export/bench."""

import json
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from checkpoints import llama_config, nemotron_h_config, write_checkpoint, write_text
from models import (_randomized, tiny_bamba, tiny_granite_hybrid, tiny_llama, tiny_mamba2, tiny_mistral,
                    tiny_nemotron_h, tiny_qwen2)
from graphprune.apply import apply
from graphprune.export import ExportError, export_model, export_path
from graphprune.export.onnx import OnnxGenerator
from graphprune.export.stateful import StatefulDecode, StatefulPrefill, greedy_generate, state_specs
from graphprune.export.trtllm import DATASET_FILE, OPTIONS_FILE, check_checkpoint, config_problems
from graphprune.spec import parse_spec

ONNX_TOLERANCE = 1e-4  # fp32 ONNX Runtime against PyTorch, max abs logit difference


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    return {"root": root, "nemotron": write_checkpoint(nemotron_h_config("M-M*-M-"), root / "nemotron"),
            "llama": write_checkpoint(llama_config(), root / "llama")}


@pytest.fixture(scope="module")
def nemotron(workspace):
    return AutoModelForCausalLM.from_pretrained(workspace["nemotron"]).eval()


@pytest.fixture(scope="module")
def onnx_folder(workspace, nemotron):
    return export_model(nemotron, "onnx", workspace["root"] / "onnx")["folder"]


def tokens(batch, length, seed=0):
    return torch.randint(0, 4096, (batch, length), generator=torch.Generator().manual_seed(seed))


def full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def prefill_then_decode(model, ids, prompt: int, reference):
    """The explicit-state driver: prefill `prompt` tokens, decode the rest one by one; each step's logits
    equal the full forward's (`reference`) to 1e-5. Returns the final state."""
    with torch.no_grad():
        logits, *state = StatefulPrefill(model)(ids[:, :prompt])
        assert torch.allclose(logits, reference[:, :prompt], atol=1e-5)
        decode = StatefulDecode(model)
        for t in range(prompt, ids.shape[1]):
            logits, *state = decode(ids[:, t:t + 1], *state)
            assert torch.allclose(logits[:, 0], reference[:, t], atol=1e-5), t
    return state


def test_prefill_then_decode_reproduces_the_full_forward(nemotron):
    ids = tokens(2, 45)  # crosses two Mamba chunks (16) with a remainder
    state = prefill_then_decode(nemotron, ids, 37, full_logits(nemotron, ids))
    assert [s.name for s in state_specs(nemotron)] == ["conv.0", "ssm.0", "conv.2", "ssm.2", "key.3", "value.3",
                                                      "conv.5", "ssm.5"]
    assert state[-1].dtype == torch.float32 and state[-1].shape == (2, 8, 6, 8)  # [B, H, P, N]
    assert state[4].shape == (2, 2, 45, 12)  # key cache [B, kv_heads, T, head_dim]


def test_onnx_prefill_and_decode_match_pytorch(nemotron, onnx_folder):
    generator = OnnxGenerator(onnx_folder)
    ids = tokens(3, 40, seed=1)
    reference = full_logits(nemotron, ids).numpy()
    logits, state = generator.prefill(ids[:, :33].numpy())  # any length: not a chunk multiple
    assert np.abs(logits - reference[:, :33]).max() < ONNX_TOLERANCE
    for t in range(33, 40):
        logits, state = generator.decode(ids[:, t:t + 1].numpy(), state)
        assert np.abs(logits[:, 0] - reference[:, t]).max() < ONNX_TOLERANCE, t
    short = generator.prefill(ids[:1, :3].numpy())[0]  # batch and length differ from the traced example
    assert np.abs(short - reference[:1, :3]).max() < ONNX_TOLERANCE
    assert np.array_equal(generator.generate(ids[:, :6].numpy(), 5), greedy_generate(nemotron, ids[:, :6], 5).numpy())


def test_onnx_refuses_a_family_without_a_stateful_graph(tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM  # not a written family; its fused qkv_proj has no layout

    phi3 = _randomized(Phi3ForCausalLM(Phi3Config(
        vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)))
    with pytest.raises(ExportError, match="onnx: .*'phi3'.*nemotron_h, mamba2, llama, qwen2, mistral, "
                                          "granitemoehybrid, bamba"):
        export_model(phi3, "onnx", tmp_path / "onnx-phi3")


# Every family the stateful driver serves besides Nemotron-H: Mamba2 alone, Bamba (RoPE), Granite 4.0-H with
# dense MLPs and RoPE (decode positions come from the key cache's length; its default has no RoPE), Llama, and
# Mistral with a sliding window (7) shorter than the prompt (33) and the sequence (40): masked in both graphs.
STATEFUL_MODELS = {
    "mamba2": lambda: tiny_mamba2(),
    "bamba": lambda: tiny_bamba(),
    "granite-rope": lambda: tiny_granite_hybrid(("attention", "mamba", "mamba", "attention"), rope=True),
    "llama": lambda: tiny_llama(),
    "mistral-window": lambda: tiny_mistral(window=7),
}
# ONNX export is the slow part (20-50 s a model on 2 cores): Mamba2 and dense Granite (the hybrids the
# families issue names) and Mistral (RoPE, sliding window); Bamba's and Llama's branches are those same
# kinds, and the runtime benchmark (benchmarks/families.py) exports every family with a layout.
ONNX_CASES = ("mamba2", "granite-rope", "mistral-window")


@pytest.mark.parametrize("name", list(STATEFUL_MODELS))
def test_stateful_and_onnx_serve_every_family_with_a_layout(name, tmp_path):
    model = STATEFUL_MODELS[name]()
    ids = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(1))
    reference = full_logits(model, ids)
    state = prefill_then_decode(model, ids, 33, reference)  # the PyTorch driver first: past a chunk (16), then decode
    specs = state_specs(model)
    assert len(state) == len(specs) and all(s.dtype == torch.float32 for s in state)
    for spec, tensor in zip(specs, state):  # the manifest's shapes, with batch 3 and 40 tokens seen
        assert tensor.shape == tuple({"batch": 3, "past": 40}.get(d, d) for d in spec.shape), spec.name
    if name not in ONNX_CASES:
        return
    generator = OnnxGenerator(export_model(model, "onnx", tmp_path / name)["folder"])
    assert [s["name"] for s in generator.manifest["states"]] == [s.name for s in specs]
    reference = reference.numpy()
    logits, state = generator.prefill(ids[:, :33].numpy())
    worst = np.abs(logits - reference[:, :33]).max()
    for t in range(33, 40):
        logits, state = generator.decode(ids[:, t:t + 1].numpy(), state)
        worst = max(worst, np.abs(logits[:, 0] - reference[:, t]).max())
    short = generator.prefill(ids[:1, :3].numpy())[0]  # batch and length differ from the traced example
    worst = max(worst, np.abs(short - reference[:1, :3]).max())
    print(f"{name}: ONNX max |dlogit| {worst:.2e}")
    assert worst < ONNX_TOLERANCE


def test_stateful_llama_family_windows_and_biases():
    """Qwen2 (q/k/v biases) with and without a sliding layer, Mistral without a window: prefill + decode reproduce
    the full forward, each layer with the window its forward applies (a runner ignoring it would not)."""
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    cases = [(tiny_qwen2(), [None, None]), (tiny_qwen2(window=5), [None, 5]), (tiny_mistral(), [None, None]),
             (tiny_mistral(window=4096), [4096, 4096])]  # Mistral's default window, longer than any test sequence
    for model, windows in cases:
        reference = full_logits(model, ids)
        layers = StatefulPrefill(model).layout.layers
        assert [sub.window for layer in layers for sub in layer if sub.kind == "attention"] == windows
        prefill_then_decode(model, ids, 17, reference)
    unwindowed = tiny_qwen2(window=5)
    unwindowed.model.layers[1].self_attn.sliding_window = None
    with torch.no_grad():
        assert not torch.allclose(StatefulPrefill(unwindowed)(ids)[0], full_logits(tiny_qwen2(window=5), ids),
                                  atol=1e-3)
    dynamic = tiny_llama()
    dynamic.model.rotary_emb.rope_type = "dynamic"
    with pytest.raises(ValueError, match="rope_type 'dynamic'"):
        state_specs(dynamic)


def test_stateful_export_names_the_layer_kind_it_cannot_carry(tmp_path):
    moe_granite = tiny_granite_hybrid(("mamba", "attention"), experts=4)
    with pytest.raises(ExportError, match=r"onnx: .*layer kind 'moe' \(layers 0, 1\) is not supported"):
        export_model(moe_granite, "onnx", tmp_path / "granite-moe")
    with pytest.raises(ValueError, match=r"layer kind 'moe' \(layers 2\) is not supported; supported layer kinds: "
                                         r"mamba, attention, mlp"):
        StatefulPrefill(tiny_nemotron_h("M-E*"))
    assert [s.name for s in state_specs(tiny_granite_hybrid(("attention", "mamba")))] == [
        "key.0", "value.0", "conv.1", "ssm.1"]


def test_bench_asks_the_family_whether_transformers_cache_serves_the_model():
    from graphprune.bench import _cache_fails

    assert _cache_fails(nemotron_h_config("M-M-")) and not _cache_fails(nemotron_h_config("M*-"))
    assert not _cache_fails(tiny_mamba2().config) and not _cache_fails(tiny_granite_hybrid().config)


def test_hf_export_reloads_with_the_runtime_keys_and_hub_layout(workspace, nemotron):
    summary = export_path(str(workspace["nemotron"]), "hf", workspace["root"] / "hf")
    folder = workspace["root"] / "hf"
    config = json.loads((folder / "config.json").read_text())
    assert config["hybrid_override_pattern"] == "M-M*-M-" and config["num_hidden_layers"] == 7
    assert config["attention_head_dim"] == config["head_dim"] and config["rms_norm_eps"] == config["layer_norm_epsilon"]
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        assert all(k.startswith(("backbone.", "lm_head.")) for k in handle.keys())
    assert "tokenizer.json" in summary["files"]
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(full_logits(reloaded, tokens(1, 20)), full_logits(nemotron, tokens(1, 20)))
    with pytest.raises(Exception, match="exists; pass --force"):
        export_path(str(workspace["nemotron"]), "hf", folder)


def test_trtllm_layout_passes_its_checks_and_broken_ones_are_named(workspace):
    folder = workspace["root"] / "trtllm"
    export_path(str(workspace["nemotron"]), "trtllm", folder, input_len=16, output_len=4, num_requests=5)
    assert check_checkpoint(folder) == []
    requests = [json.loads(line) for line in (folder / DATASET_FILE).read_text().splitlines()]
    assert len(requests) == 5 and all(len(r["input_ids"]) == 16 and r["output_tokens"] == 4 for r in requests)
    assert "mamba_ssm_cache_dtype: float32" in (folder / OPTIONS_FILE).read_text()
    assert "trtllm-bench" in (folder / "README.md").read_text()
    # the checks bite: the raw transformers save lacks the runtime keys; a missing or resized weight is named
    assert any("hybrid_override_pattern is missing" in p for p in check_checkpoint(workspace["nemotron"]))
    config = json.loads((folder / "config.json").read_text())
    assert any("num_hidden_layers" in p for p in config_problems(config | {"num_hidden_layers": 6}))
    assert config_problems(config, tp_size=4) == []  # 8 Mamba heads, 2 groups, 4 attention heads
    assert any("supports 1, 2, 4 or 8" in p for p in config_problems(config, tp_size=3))
    assert config_problems(config | {"mamba_num_heads": 6, "n_groups": 3}, tp_size=4) == [
        "mamba_num_heads (6) is not divisible by tp_size 4", "n_groups (3) and tp_size 4: one must divide the other"]
    broken = workspace["root"] / "trtllm-broken"
    broken.mkdir()
    (broken / "config.json").write_text((folder / "config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    del weights["backbone.layers.2.mixer.A_log"]
    weights["backbone.layers.1.mixer.up_proj.weight"] = weights["backbone.layers.1.mixer.up_proj.weight"][:-1]
    save_file(weights, broken / "model.safetensors")
    problems = check_checkpoint(broken)
    assert "missing weight backbone.layers.2.mixer.A_log [8]" in problems
    assert any(p.startswith("weight backbone.layers.1.mixer.up_proj.weight has shape [79, 48]") for p in problems)


def bench_cli(*args):
    done = subprocess.run([sys.executable, "-m", "graphprune.cli", "bench", *args], capture_output=True, text=True)
    done.stderr = " ".join(done.stderr.split())  # rich wraps long lines
    return done


def test_bench_json_ratios_come_from_measured_times(workspace, tmp_path):
    plot = tmp_path / "bench.png"
    done = bench_cli(str(workspace["nemotron"]), str(workspace["nemotron"]), "--json", "--input-len", "8",
                     "--output-len", "3", "--repeats", "2", "--threads", "1", "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    first, second = report["results"]
    for result in (first, second):
        assert result["engine"] == "torch" and result["peak_memory_bytes"] > 0
        assert len(result["prefill_seconds"]) == 2 and result["prefill_tokens_per_s"] > 0
        assert result["decode_tokens_per_s"] == pytest.approx(2 / statistics.median(result["decode_seconds"]))
    total = [statistics.median(r["prefill_seconds"]) + statistics.median(r["decode_seconds"]) for r in (first, second)]
    assert first["speedup_vs_first"] == 1.0
    assert second["speedup_vs_first"] == pytest.approx(total[0] / total[1])
    assert second["ideal_speedup_vs_first"] == 1.0  # the same weights
    rounds = [(p0 + d0) / (p1 + d1) for p0, d0, p1, d1 in zip(first["prefill_seconds"], first["decode_seconds"],
                                                              second["prefill_seconds"], second["decode_seconds"])]
    assert second["speedup_range"] == [min(rounds), max(rounds)]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_onnxruntime_and_clear_errors(workspace, onnx_folder):
    done = bench_cli(onnx_folder, "--engine", "onnxruntime", "--json", "--input-len", "8", "--output-len", "3",
                     "--repeats", "1", "--plot", "")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["results"][0]
    assert result["engine"] == "onnxruntime" and result["decode_tokens_per_s"] > 0
    done = bench_cli(str(workspace["nemotron"]), "--engine", "trtllm", "--plot", "")
    assert done.returncode == 2 and "tensorrt_llm" in done.stderr
    done = bench_cli(str(workspace["nemotron"]), "--engine", "tensorflow", "--plot", "")
    assert done.returncode == 2 and "registered: onnxruntime, torch, trtllm" in done.stderr
    done = bench_cli(str(workspace["root"] / "missing"), "--plot", "")
    assert done.returncode == 2 and "missing: no such model folder" in done.stderr


def test_apply_exports_and_benches_at_the_end(workspace):
    text = write_text(workspace["root"] / "text.txt")
    spec = parse_spec({
        "model": {"path": str(workspace["nemotron"])},
        "calibration": {"data": {"path": str(text)}, "num_samples": 4, "seq_len": 32},
        "targets": {"mamba_num_heads": 4, "ffn_hidden_size": 40}, "output": str(workspace["root"] / "pruned"),
        "export": {"formats": ["onnx", "trtllm"], "num_requests": 3},
        "bench": {"engines": ["torch"], "input_len": 8, "output_len": 3, "repeats": 1, "threads": 1}})
    report = apply(spec, force=True)
    out = workspace["root"] / "pruned"
    assert report["export"] == {"onnx": "export/onnx", "trtllm": "export/trtllm"}
    assert check_checkpoint(out / "export" / "trtllm") == [] and check_checkpoint(out) == []
    assert json.loads((out / "export/trtllm/config.json").read_text())["mamba_num_heads"] == 4
    original, pruned = report["bench"]["torch"]["results"]
    assert (original["model"], pruned["model"]) == ("original", "pruned")
    assert pruned["params"] == report["pruned"]["params"] < original["params"]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokens(1, 12)
    onnx_logits = OnnxGenerator(out / "export" / "onnx").prefill(ids.numpy())[0]
    assert np.abs(onnx_logits - full_logits(model, ids).numpy()).max() < ONNX_TOLERANCE


def test_export_and_bench_sections_run_last_unless_the_pipeline_places_them():
    from graphprune.pipeline import pipeline_of

    base = {"model": {"path": "m"}, "export": {"formats": ["hf"]}, "bench": {}}
    default = [name for name, _ in pipeline_of(parse_spec(base), dry_run=False)]
    assert default[-3:] == ["verify", "export", "bench"]
    explicit = parse_spec(base | {"passes": [{"name": "plan"}, {"name": "export"}, {"name": "materialize"}]})
    assert [name for name, _ in pipeline_of(explicit, dry_run=False)] == ["plan", "export", "materialize", "bench"]
    assert [name for name, _ in pipeline_of(explicit, dry_run=True)] == ["plan"]


def test_rewriting_a_checkpoint_leaves_no_stale_weight_shards(workspace, nemotron, tmp_path):
    from graphprune.export.hf import write_hf_checkpoint

    folder = tmp_path / "model"
    nemotron.save_pretrained(folder, max_shard_size="100KB")  # an earlier, sharded save
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    write_hf_checkpoint(nemotron, folder)
    assert sorted(p.name for p in folder.glob("*.safetensors*")) == ["model.safetensors"]
    assert check_checkpoint(folder) == []


def test_bench_flags_ratios_it_cannot_support():
    from graphprune.bench import BenchResult, add_ratios

    def result(name, matmul, seconds):
        return BenchResult(model=name, engine="torch", params=matmul, matmul_params=matmul, prefill_tokens_per_s=1,
                           decode_tokens_per_s=1, peak_memory_bytes=1, prefill_seconds=[0.0] * len(seconds),
                           decode_seconds=seconds)

    base = result("original", 100, [1.0, 1.0, 1.0])
    noisy = result("pruned-noisy", 50, [0.8, 1.3, 0.9])     # rounds 1.25x, 0.77x, 1.11x: straddles 1.0
    loaded = result("pruned-loaded", 50, [0.11, 0.12, 0.10])  # ~9x against an ideal of 2x, spread ~1.5
    honest = result("pruned", 50, [0.55, 0.52, 0.58])        # ~1.9x, within the ideal
    add_ratios([base, noisy, loaded, honest])
    assert base.flags == [] and honest.flags == []
    assert noisy.speedup_range == pytest.approx((1 / 1.3, 1 / 0.8))
    assert any("no significant difference" in f for f in noisy.flags)
    assert any("exceeds the ideal 2.00x" in f for f in loaded.flags)
