"""kill -9 at the worst moments: the rerun succeeds, nothing partial stays, no data is lost.

`apply` is killed by a plugin pass that SIGKILLs its own process (after calibrate, after materialize);
`distill` and `search` by a wrapper script that SIGKILLs them mid-training. The killed runs are
subprocesses; the reruns run in this process.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from checkpoints import nemotron_h_config, write_checkpoint, write_text
from graphprune.apply import apply
from graphprune.distill import run_distill
from graphprune.search import run_search
from graphprune.spec import load_spec

KILL_PASS = '''
import os, signal
from graphprune.pipeline import register_pass

@register_pass("kill_here")
def kill_here(ctx):
    """SIGKILL this process: a crash, an OOM kill or a preemption at this point of the pipeline."""
    os.kill(os.getpid(), signal.SIGKILL)
'''

KILL_DISTILL_AT_STEP = '''
import os, signal, sys
import graphprune.distill as distill

progress_printer = distill.progress_printer

def killing_printer(*args, **kwargs):
    bar, update = progress_printer(*args, **kwargs)
    def update_then_kill(record):
        update(record)
        if record["step"] == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)
    return bar, update_then_kill

distill.progress_printer = killing_printer
from graphprune.cli import app
app(sys.argv[1:])
'''

KILL_SEARCH_IN_DISTILL = '''
import os, signal, sys
import graphprune.distill as distill

def killed_while_training(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

distill.distill = killed_while_training  # distill_in_process has made its scratch folder by now
from graphprune.cli import app
app(sys.argv[1:])
'''


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    write_checkpoint(nemotron_h_config(), root / "model")
    write_text(root / "text.txt", 40_000)
    (root / "kill_here.py").write_text(KILL_PASS)
    (root / "kill_distill.py").write_text(KILL_DISTILL_AT_STEP)
    (root / "kill_search.py").write_text(KILL_SEARCH_IN_DISTILL)
    return root


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def graphprune(*args, script: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, script] if script else [sys.executable, "-m", "graphprune.cli"]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def write_spec(root: Path, name: str, **parts) -> Path:
    spec = {"model": {"path": str(root / "model")},
            "calibration": {"data": {"path": str(root / "text.txt")}, "num_samples": 4, "seq_len": 32},
            "targets": {"ffn_hidden_size": 48, "mamba_num_heads": 4}, "output": str(root / name), **parts}
    path = root / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def hidden_siblings(root: Path, name: str) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("after", ["calibrate", "materialize"])
def test_apply_killed_mid_run_leaves_nothing_that_the_rerun_keeps(root, after):
    model = hashes(root / "model")
    pipeline = ["calibrate", "plan", "prune", "materialize", "verify"]
    killed = pipeline[: pipeline.index(after) + 1] + ["kill_here"] + pipeline[pipeline.index(after) + 1:]
    name = f"apply-{after}"
    spec = write_spec(root, name, plugins=["kill_here"], passes=[{"name": n} for n in killed])
    run = graphprune("apply", str(spec))
    assert run.returncode == -9, run.stderr[-2000:]
    assert not (root / name).exists()
    assert any(".partial-" in n for n in hidden_siblings(root, name))  # what the kill left behind

    apply(load_spec(write_spec(root, name)))  # the rerun, in this process
    assert (root / name / "model.safetensors").is_file() and (root / name / "report.json").is_file()
    assert hidden_siblings(root, name) == []  # partial folder and lock gone
    assert hashes(root / "model") == model


def test_distill_killed_mid_run_resumes_to_the_uninterrupted_weights_and_log(root):
    distill = {"data": {"path": str(root / "text.txt")}, "seq_len": 32, "micro_batch_size": 2, "steps": 8,
               "lr": 1e-3, "checkpoint_every": 4}
    apply(load_spec(write_spec(root, "student-whole", importance={"ffn": "magnitude", "mamba": "magnitude"},
                               reconstruct=None)))
    shutil.copytree(root / "student-whole", root / "student-killed")
    run_distill(load_spec(write_spec(root, "student-whole", distill=distill)))
    killed = write_spec(root, "student-killed", distill=distill)
    run = graphprune("distill", str(killed), script=str(root / "kill_distill.py"), env={"KILL_AT_STEP": "6"})
    assert run.returncode == -9, run.stderr[-2000:]
    run_distill(load_spec(killed), resume=True)

    def log(name):
        lines = (root / f".{name}.distill" / "log.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]

    assert log("student-killed") == log("student-whole")  # steps 5-6 ran twice but are logged once
    weights_whole = load_file(root / "student-whole" / "model.safetensors")
    weights_killed = load_file(root / "student-killed" / "model.safetensors")
    assert weights_whole.keys() == weights_killed.keys()
    assert all(torch.equal(weights_whole[k], weights_killed[k]) for k in weights_whole)


def test_search_killed_while_distilling_reruns_without_scratch_or_temp_leftovers(root, tmp_path, monkeypatch):
    params = sum(t.numel() for t in load_file(root / "model" / "model.safetensors").values())
    spec = write_spec(root, "search", targets={"params": int(params * 0.75)},
                      importance={"depth": "cosine", "depth_samples": 2},
                      search={"max_candidates": 3, "top_k": 1, "eval_sequences": 2,
                              "bench": {"input_len": 8, "output_len": 2, "repeats": 1, "threads": 1}},
                      distill={"seq_len": 32, "micro_batch_size": 2, "steps": 2, "lr": 1e-3})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the system temp folder, watched
    run = graphprune("search", str(spec), script=str(root / "kill_search.py"), env={"TMPDIR": str(tmp_path)})
    assert run.returncode == -9, run.stderr[-2000:]
    assert [p.name for p in (root / "search").glob(".distill-scratch-*")]  # the kill left its scratch
    run_search(load_spec(spec), console=Console(stderr=True))  # the rerun, in this process
    report = json.loads((root / "search" / "search.json").read_text())
    assert report["best"] and all(c["zero_shot_loss"] is not None for c in report["candidates"].values())
    assert list((root / "search").glob(".distill-scratch-*")) == []
    assert hidden_siblings(root, "search") == []
    assert [p.name for p in tmp_path.iterdir() if "graphprune" in p.name] == []
