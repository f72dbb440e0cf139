"""Data safety: an output never overwrites the user's inputs, scores are never stale, one run per output."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from checkpoints import nemotron_h_config, write_checkpoint, write_text
from graphprune.apply import apply
from graphprune.cli import app
from graphprune.outputs import AtomicOutput, OutputError
from graphprune.spec import load_spec

runner = CliRunner()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    model = write_checkpoint(nemotron_h_config(), root / "model")
    data = root / "data"
    data.mkdir()
    return {"root": root, "model": model, "text": write_text(data / "text.txt")}


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_spec(folder: Path, inputs, output, targets=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"model": {"path": str(inputs["model"])},
            "calibration": {"data": {"path": str(inputs["text"])}, "num_samples": 4, "seq_len": 32},
            "targets": targets or {"ffn_hidden_size": 64}, "output": output}
    path = folder / "spec.json"
    path.write_text(json.dumps(spec))
    return path


@pytest.mark.parametrize("output", ["{model}", "{model}/pruned", "{root}", "{data}", "{specs}", "{specs}/..", "/",
                                    "~", "."])
def test_force_never_replaces_or_writes_into_the_users_folders(inputs, output, monkeypatch):
    specs = inputs["root"] / "specs"
    monkeypatch.chdir(inputs["root"])
    target = output.format(model=inputs["model"], root=inputs["root"], data=inputs["text"].parent, specs=specs)
    spec_path = write_spec(specs, inputs, target)
    before = {name: hashes(inputs[name] if name != "text" else inputs["text"].parent) for name in ("model", "text")}
    specs_before = hashes(specs)
    result = runner.invoke(app, ["apply", str(spec_path), "--force"])
    assert result.exit_code == 2, result.output
    assert "output" in result.output and ("is " in result.output or "contains" in result.output
                                          or "overlaps" in result.output)
    assert {name: hashes(inputs[name] if name != "text" else inputs["text"].parent) for name in ("model", "text")} == before
    assert hashes(specs) == specs_before


def test_empty_output_is_refused(inputs, tmp_path):
    spec_path = write_spec(tmp_path / "specs", inputs, "")
    result = runner.invoke(app, ["apply", str(spec_path), "--force"])
    assert result.exit_code == 2 and "output" in result.output
    assert (tmp_path / "specs" / "spec.json").is_file()


def test_output_beside_the_inputs_is_written(inputs, tmp_path):
    spec_path = write_spec(tmp_path / "specs", inputs, "../out/pruned")
    report = apply(load_spec(spec_path), force=True)
    assert (tmp_path / "out" / "pruned" / "config.json").is_file()
    assert report["pruned"]["params"] < report["original"]["params"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pruned"]  # no lock, partial or old left


def test_calibration_cache_is_keyed_on_the_data_content(inputs, tmp_path):
    data = tmp_path / "data" / "text.txt"
    data.parent.mkdir()
    data.write_text(inputs["text"].read_text())
    local = {**inputs, "text": data}
    spec_path = write_spec(tmp_path / "specs", local, "../out")
    first = apply(load_spec(spec_path), force=True)
    again = apply(load_spec(spec_path), force=True)
    data.write_text("\n\n".join(reversed(inputs["text"].read_text().split("\n\n"))))  # same path, new content
    edited = apply(load_spec(spec_path), force=True)
    source = [next(p for p in r["passes"] if p["name"] == "calibrate")["source"] for r in (first, again, edited)]
    assert source == ["4 samples", "cache", "4 samples"]


def test_a_second_run_on_a_locked_output_fails_naming_the_holder(tmp_path):
    target = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from graphprune.outputs import AtomicOutput\n"
        f"with AtomicOutput({str(target)!r}, force=False):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            with AtomicOutput(target, force=True):
                pass
        assert not target.exists()
    finally:
        holder.kill()
        holder.wait()
    with AtomicOutput(target, force=False) as workdir:  # the killed holder's lock is gone with it
        (workdir / "done").write_text("ok")
    assert (target / "done").read_text() == "ok"


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{dead.stdout.strip()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    (tmp_path / f".out.old-{dead.stdout.strip()}").write_text("old")
    with AtomicOutput(target, force=False) as workdir:
        (workdir / "x").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_run_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with AtomicOutput(tmp_path / "out", force=False):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_data_is_refused_naming_the_file(tmp_path):
    from graphprune.data import DataError, check_data, load_texts
    from graphprune.spec import DataSpec

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n{"text": null}\n')
    with pytest.raises(DataError, match=r"rows.jsonl: record 1: field 'text' is NoneType, not text"):
        load_texts(DataSpec(path=str(rows)))
    with pytest.raises(DataError, match="is a folder"):
        check_data(DataSpec(path=str(tmp_path)), "calibration.data")


def test_a_huge_value_in_a_spec_error_is_cut(tmp_path):
    from graphprune.spec import SpecError, parse_spec

    with pytest.raises(SpecError) as info:
        parse_spec({"model": {"path": "x", "dtype": "f" * 5_000_000}})
    assert len(str(info.value)) < 1000 and "5,000,000 characters" in str(info.value)


def test_a_checkpoint_with_a_nan_or_a_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from graphprune.trace import LoadError, load_model

    folder = write_checkpoint(nemotron_h_config(), tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if k.endswith("up_proj.weight"))
    poisoned = dict(weights)
    poisoned[name] = poisoned[name].clone()
    poisoned[name][0, 0] = float("nan")
    save_file(poisoned, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match="weight .*up_proj.weight holds NaN"):
        load_model(str(folder))
    save_file({k: v for k, v in weights.items() if k != name}, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LoadError, match="missing"):
        load_model(str(folder))


def test_a_plugin_beside_the_spec_imports_and_a_bad_name_is_a_user_error(inputs, tmp_path):
    from graphprune.pipeline import PASSES, PipelineError, load_passes

    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "beside_the_spec.py").write_text(
        "from graphprune.pipeline import PassResult, register_pass\n"
        "@register_pass('beside_the_spec')\n"
        "def beside(ctx):\n    return PassResult()\n")
    spec = json.loads(write_spec(specs, inputs, "../out").read_text())
    (specs / "spec.json").write_text(json.dumps({**spec, "plugins": ["beside_the_spec"]}))
    apply(load_spec(specs / "spec.json"), dry_run=True)
    assert "beside_the_spec" in PASSES
    for name in ("", ".x", "a b"):
        with pytest.raises(PipelineError, match="not a Python module name"):
            load_passes([name])


def test_installed_entry_point_plugins_are_loaded(monkeypatch):
    import graphprune.pipeline as pipeline

    loaded = []

    class Entry:
        def load(self):
            loaded.append(True)

    monkeypatch.setattr(pipeline, "entry_points", lambda group: [Entry()] if group == "graphprune.passes" else [])
    pipeline.load_passes([])
    assert loaded == [True]


def test_a_full_disk_is_a_user_error_and_leaves_nothing(tmp_path):
    import errno

    with pytest.raises(OutputError, match="the disk filled up"):
        with AtomicOutput(tmp_path / "out", force=False) as workdir:
            (workdir / "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_search_never_writes_into_the_model_folder(inputs):
    from graphprune.search import run_search
    from graphprune.spec import parse_spec

    before = hashes(inputs["model"])
    spec = parse_spec({"model": {"path": str(inputs["model"])}, "targets": {"params": 10_000},
                       "search": {}, "distill": {"steps": 1}, "output": str(inputs["model"] / "search")})
    with pytest.raises(OutputError, match="overlaps the model folder"):
        run_search(spec, console=None)
    assert hashes(inputs["model"]) == before and not (inputs["model"] / "search").exists()


def test_a_checkpoint_is_written_with_the_usual_file_mode_and_no_leftovers(tmp_path):
    import os

    from transformers import AutoModelForCausalLM

    from graphprune.export.hf import write_hf_checkpoint

    model = AutoModelForCausalLM.from_config(nemotron_h_config())
    out = tmp_path / "out"
    (out / ".writing-999999").mkdir(parents=True)  # what a killed write left
    old = os.umask(0o022)
    try:
        write_hf_checkpoint(model, out)
    finally:
        os.umask(old)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == 0o644  # safetensors alone would write 0600
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_distill_never_trains_the_teacher_in_place_and_one_run_per_student(inputs, tmp_path):
    from graphprune.distill import run_distill
    from graphprune.outputs import OutputLock
    from graphprune.spec import parse_spec

    before = hashes(inputs["model"])
    into_teacher = parse_spec({"model": {"path": str(inputs["model"])}, "output": str(inputs["model"]),
                               "distill": {"data": {"path": str(inputs["text"])}, "steps": 1}})
    with pytest.raises(OutputError, match="is the teacher's folder"):
        run_distill(into_teacher)
    assert hashes(inputs["model"]) == before
    student = tmp_path / "student"
    student.mkdir()
    (student / "config.json").write_text((inputs["model"] / "config.json").read_text())
    spec = parse_spec({"model": {"path": str(inputs["model"])}, "output": str(student),
                       "distill": {"data": {"path": str(inputs["text"])}, "steps": 1}})
    with OutputLock(student.resolve()):  # another distillation of this student is running
        with pytest.raises(OutputError, match="being written by another graphprune run"):
            run_distill(spec)
