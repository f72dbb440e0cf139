"""reconstruct: the least-squares refit of the weights that read pruned units."""

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from checkpoints import DEMO, llama_config, nemotron_h_config, write_checkpoint, write_text
from graphprune.apply import apply
from graphprune.spec import parse_spec


def prune(folder, text, out, targets, reconstruct):
    spec = {"model": {"path": str(folder)},
            "calibration": {"data": {"path": str(text)}, "num_samples": 16, "seq_len": 64, "batch_size": 4},
            "targets": targets, "output": str(out)}
    if not reconstruct:
        spec["reconstruct"] = None
    elif isinstance(reconstruct, dict):
        spec["reconstruct"] = reconstruct
    report = apply(parse_spec(spec), force=True)
    return report, AutoModelForCausalLM.from_pretrained(out).eval()


def heldout_ids(folder, sequences=4, length=64):
    """Text the calibration never saw (write_text takes the corpus' first 120k characters)."""
    import gzip

    from transformers import AutoTokenizer

    with gzip.open(DEMO / "corpus" / "valid.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read()[200_000:260_000]
    ids = AutoTokenizer.from_pretrained(folder)(text)["input_ids"][: sequences * length]
    return torch.tensor(ids).view(sequences, length)


def heldout_kl(teacher, student, ids):
    with torch.no_grad():
        reference = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits, -1).flatten(0, 1)
        got = F.log_softmax(student(input_ids=ids, use_cache=False).logits, -1).flatten(0, 1)
    return F.kl_div(got, reference, log_target=True, reduction="batchmean").item()


def test_reconstruct_lowers_the_heldout_loss_of_a_half_width_model(tmp_path):
    folder = write_checkpoint(llama_config(), tmp_path / "model")
    text = write_text(tmp_path / "text.txt")
    targets = {"ffn_hidden_size": 40, "num_attention_heads": 4}
    plain_report, plain = prune(folder, text, tmp_path / "plain", targets, reconstruct=False)
    report, fitted = prune(folder, text, tmp_path / "fitted", targets, reconstruct=True)
    errors = report["reconstruct"]
    assert set(errors) == {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")}
    assert all(e["after"] <= e["before"] for e in errors.values())
    assert sum(e["after"] for e in errors.values()) < 0.9 * sum(e["before"] for e in errors.values())
    assert fitted.num_parameters() == plain.num_parameters() == report["pruned"]["params"]
    assert next(p for p in report["passes"] if p["name"] == "verify")["max_abs_logit_diff"] <= 1e-4
    teacher = AutoModelForCausalLM.from_pretrained(folder).eval()
    heldout = heldout_ids(folder)
    assert heldout_kl(teacher, fitted, heldout) < heldout_kl(teacher, plain, heldout)
    assert plain_report["groups"] == report["groups"]  # the same units; only their readers' weights changed


def test_reconstruct_refits_a_hybrids_out_proj_and_keeps_the_checkpoint_standard(tmp_path):
    folder = write_checkpoint(nemotron_h_config(), tmp_path / "model")
    text = write_text(tmp_path / "text.txt")
    report, model = prune(folder, text, tmp_path / "out", {"mamba_num_heads": 4, "ffn_hidden_size": 40}, True)
    assert {"model.layers.0.mixer.out_proj", "model.layers.1.mixer.down_proj"} <= set(report["reconstruct"])
    assert all(e["after"] <= e["before"] for e in report["reconstruct"].values())
    assert model.num_parameters() == report["pruned"]["params"]


def test_reconstruct_refits_the_readers_of_the_residual_stream_but_not_a_tied_head(tmp_path):
    folder = write_checkpoint(llama_config(tied=True), tmp_path / "model")
    text = write_text(tmp_path / "text.txt")
    report, model = prune(folder, text, tmp_path / "out", {"hidden_size": 36}, True)
    refitted = set(report["reconstruct"])
    assert {f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")} <= refitted
    assert {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"} <= refitted
    assert "lm_head" not in refitted                       # tied to the embedding: left alone
    rescaled = next(p for p in report["passes"] if p["name"] == "reconstruct")["norms_rescaled"]
    assert rescaled == 5                                    # two norms per layer and the final one
    assert all(e["after"] <= e["before"] for e in report["reconstruct"].values())
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    _, plain = prune(folder, text, tmp_path / "plain", {"hidden_size": 36}, False)
    teacher = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert heldout_kl(teacher, model, heldout_ids(folder)) < heldout_kl(teacher, plain, heldout_ids(folder))
    assert next(p for p in report["passes"] if p["name"] == "verify")["max_abs_logit_diff"] <= 1e-4


def test_reconstruct_in_memory_bounded_chunks_equals_all_at_once(tmp_path):
    from safetensors.torch import load_file

    from graphprune.passes.reconstruct import gram_chunks

    folder = write_checkpoint(nemotron_h_config(), tmp_path / "model")
    text = write_text(tmp_path / "text.txt")
    targets = {"hidden_size": 32, "mamba_num_heads": 4, "ffn_hidden_size": 40}
    whole, _ = prune(folder, text, tmp_path / "whole", targets, True)
    small = 8 * 64 ** 2  # room for one Gram of a 64-wide input at a time
    chunked, _ = prune(folder, text, tmp_path / "chunked", targets, {"max_gram_bytes": small})
    passes = {r["name"]: r for r in chunked["passes"]}["reconstruct"]["passes_over_samples"]
    assert passes > 1 and {r["name"]: r for r in whole["passes"]}["reconstruct"]["passes_over_samples"] == 1
    assert chunked["reconstruct"] == whole["reconstruct"]
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "chunked" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert gram_chunks(["a", "b", "c"], {"a": 10, "b": 10, "c": 100}, budget=8 * 200) == [["c"], ["a", "b"]]
