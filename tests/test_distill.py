"""Distillation: the contract, exact resume, 2 processes == 1 process, loss definition, refusals."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from checkpoints import nemotron_h_config, write_checkpoint, write_text
from graphprune.apply import apply
from graphprune.distill import DistillError, kd_loss, run_distill
from graphprune.spec import parse_spec

MAGNITUDE = {"hidden": "magnitude", "ffn": "magnitude", "mamba": "magnitude", "attention": "magnitude"}
DISTILL = {"seq_len": 64, "micro_batch_size": 2, "steps": 12, "lr": 0.001, "checkpoint_every": 4}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher = write_checkpoint(nemotron_h_config(), root / "teacher")
    text = write_text(root / "text.txt", 60_000)
    apply(parse_spec({"model": {"path": str(teacher)}, "importance": MAGNITUDE,
                      "targets": {"hidden_size": 32, "ffn_hidden_size": 40, "mamba_num_heads": 4},
                      "output": str(root / "student")}), force=True)
    return {"root": root, "teacher": teacher, "text": text, "student": root / "student"}


def spec_in(setup, name, **distill):
    folder = setup["root"] / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(folder.parent / f".{name}.distill", ignore_errors=True)
    shutil.copytree(setup["student"], folder)
    data = {"model": {"path": str(setup["teacher"])}, "output": str(folder),
            "distill": {"data": {"path": str(setup["text"])}, **DISTILL, **distill}}
    path = setup["root"] / f"{name}.json"
    path.write_text(json.dumps(data))
    return path, parse_spec(data)


def log_path(setup, name):
    return setup["root"] / f".{name}.distill" / "log.jsonl"


def log_of(setup, name):
    return [json.loads(line) for line in log_path(setup, name).read_text().splitlines()]


def test_contract_json_and_reload(setup):
    path, _ = spec_in(setup, "contract")
    out = subprocess.run([sys.executable, "-m", "graphprune.cli", "distill", str(path), "--json"],
                         capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 2 * 64
    assert summary["final_loss"] > 0 and summary["eval_loss"] > 0
    log = log_of(setup, "contract")
    assert [r["step"] for r in log] == list(range(1, 13))
    assert sum(r["loss"] for r in log[-3:]) < sum(r["loss"] for r in log[:3])  # it learns
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(setup["root"] / "contract")
    original = AutoModelForCausalLM.from_pretrained(setup["student"])
    assert not torch.equal(student.model.embeddings.weight, original.model.embeddings.weight)


def test_resume_continues_the_same_loss_curve(setup):
    _, whole = spec_in(setup, "whole")
    run_distill(whole)
    _, parts = spec_in(setup, "parts")
    first = run_distill(parts, until_step=6)
    assert not first["complete"]
    with open(log_path(setup, "parts"), "a") as f:  # a kill after step 8, past the step-6 checkpoint
        f.write(json.dumps({"step": 7, "loss": 0.0}) + "\n" + json.dumps({"step": 8, "loss": 0.0}) + "\n")
    run_distill(parts, resume=True)
    assert [r["step"] for r in log_of(setup, "parts")] == list(range(1, 13))  # no step logged twice
    uninterrupted = [r["loss"] for r in log_of(setup, "whole")]
    resumed = [r["loss"] for r in log_of(setup, "parts")]
    assert len(resumed) == len(uninterrupted) == 12
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(uninterrupted), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("distributed,port", [("ddp", 29531), ("fsdp", 29532)])
def test_two_processes_follow_one_process_and_write_the_student(setup, distributed, port):
    _, single = spec_in(setup, f"single-{distributed}", grad_accum=2, steps=8)
    run_distill(single)
    # 2 ranks x 2 sequences = the same global batch
    path, _ = spec_in(setup, f"pair-{distributed}", grad_accum=1, steps=8, distributed=distributed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), "-m", "graphprune.cli", "distill", str(path), "--json"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    one = torch.tensor([r["loss"] for r in log_of(setup, f"single-{distributed}")])
    two = torch.tensor([r["loss"] for r in log_of(setup, f"pair-{distributed}")])
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-5)
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(0))
    alone = AutoModelForCausalLM.from_pretrained(setup["root"] / f"single-{distributed}").eval()
    together = AutoModelForCausalLM.from_pretrained(setup["root"] / f"pair-{distributed}").eval()
    with torch.no_grad():  # the student the 2 ranks wrote is the one 1 process trained
        torch.testing.assert_close(together(ids).logits, alone(ids).logits, rtol=1e-3, atol=1e-4)


def test_kd_loss_definition():
    logits = torch.randn(2, 5, 11)
    assert kd_loss(logits, logits).abs() < 1e-6
    other = torch.randn(2, 5, 11)
    p, q = other.softmax(-1), logits.log_softmax(-1)
    expected = (p * (p.log() - q)).sum(-1).mean()
    torch.testing.assert_close(kd_loss(logits, other), expected)
    assert kd_loss(logits, other, top_k=11) == pytest.approx(kd_loss(logits, other).item(), rel=1e-5)
    assert kd_loss(logits, other, temperature=2.0) > 0


def test_mismatched_vocabularies_are_refused(setup, tmp_path):
    small = nemotron_h_config()
    small.vocab_size = 96
    other = write_checkpoint(small, tmp_path / "other")
    _, spec = spec_in(setup, "vocab")
    spec = spec.model_copy(update={"distill": spec.distill.model_copy(update={"teacher": str(other)})})
    with pytest.raises(DistillError, match="vocabularies differ"):
        run_distill(spec)


def test_probe_mixing_replaces_a_seeded_share_of_training_rows():
    from graphprune.demo.probes import COPY, INDUCT, MQAR
    from graphprune.data import DataError, mix_probes

    text = torch.full((40, 64), 9, dtype=torch.long)
    mixed = mix_probes(text, 0.25, 4096, seed=3, where="distill.probe_fraction")
    replaced = (mixed != text).any(dim=1)
    assert replaced.sum().item() == 10
    assert set(mixed[replaced, 0].tolist()) == {MQAR, INDUCT, COPY}  # the three kinds, in turn
    assert torch.equal(mixed, mix_probes(text, 0.25, 4096, seed=3, where="x"))
    assert not torch.equal(mixed, mix_probes(text, 0.25, 4096, seed=4, where="x"))
    with pytest.raises(DataError, match="distill.probe_fraction: .* this tokenizer has 1000 tokens"):
        mix_probes(text, 0.25, 1000, seed=3, where="distill.probe_fraction")


def test_calibration_can_mix_in_probe_sequences(tmp_path):
    from graphprune.data import calibration_batches, load_tokenizer
    from graphprune.demo.probes import COPY, INDUCT, MQAR
    from graphprune.spec import CalibrationSpec

    tokenizer = load_tokenizer(str(write_checkpoint(nemotron_h_config(), tmp_path / "model")))
    spec = CalibrationSpec(data={"path": str(write_text(tmp_path / "text.txt"))}, num_samples=8, seq_len=32,
                           batch_size=4, probe_fraction=0.5)
    rows = torch.cat(calibration_batches(spec, tokenizer))
    text = torch.cat(calibration_batches(spec.model_copy(update={"probe_fraction": 0.0}), tokenizer))
    replaced = (rows != text).any(dim=1)
    assert rows.shape == (8, 32) and replaced.sum().item() == 4
    assert set(rows[replaced, 0].tolist()) == {MQAR, INDUCT, COPY}
