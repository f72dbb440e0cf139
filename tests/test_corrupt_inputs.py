"""Every corrupt or unusable input is one clear user error naming the file or field, with nothing written.

Each case builds a fresh workspace (a tiny Nemotron-H checkpoint, calibration text, a spec), breaks one
thing, runs `graphprune apply` through the CLI in-process and checks: exit code 2, the message names
the culprit, no output folder, no leftovers beside it, and the input model untouched.
"""

import gzip
import hashlib
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from checkpoints import nemotron_h_config, write_checkpoint, write_text
from graphprune.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return write_checkpoint(nemotron_h_config(), root / "model"), write_text(root / "text.txt", chars=20_000)


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Workspace:
    """A private copy of the inputs that one case may break."""

    def __init__(self, root: Path, pristine):
        model, text = pristine
        self.root = root
        self.model = root / "model"
        self.model.mkdir()
        for file in model.iterdir():
            (self.model / file.name).write_bytes(file.read_bytes())
        self.data = root / "text.txt"
        self.data.write_bytes(text.read_bytes())
        self.output = root / "out"
        self.spec = {"model": {"path": str(self.model)},
                     "calibration": {"data": {"path": str(self.data)}, "num_samples": 4, "seq_len": 32},
                     "targets": {"ffn_hidden_size": 64}, "output": str(self.output)}

    @property
    def weights(self) -> Path:
        return self.model / "model.safetensors"

    def spec_file(self) -> Path:
        path = self.root / "spec.json"
        if not path.exists():
            path.write_text(json.dumps(self.spec))
        return path


def _poison(ws: Workspace, fn) -> None:
    weights = load_file(ws.weights)
    fn(weights)
    save_file(weights, ws.weights, metadata={"format": "pt"})


def nan_weight(ws):
    def poison(weights):
        name = next(k for k in weights if k.endswith("up_proj.weight"))
        weights[name][0, 0] = float("nan")
    _poison(ws, poison)


def missing_tensor(ws):
    _poison(ws, lambda weights: weights.pop(next(k for k in weights if k.endswith("up_proj.weight"))))


def wrong_shape(ws):
    def poison(weights):
        name = next(k for k in weights if k.endswith("up_proj.weight"))
        weights[name] = weights[name][:-1].clone()
    _poison(ws, poison)


class Hostile:
    def __reduce__(self):  # unpickling would call print: torch.load(weights_only=True) must refuse it
        return print, ("unpickled",)


def blocked_pickle(ws):
    import torch

    torch.save({"model.embeddings.weight": Hostile()}, ws.model / "pytorch_model.bin")
    ws.weights.unlink()


def data_file(name: str, content: bytes):
    def write(ws):
        ws.data = ws.root / name
        ws.data.write_bytes(content)
        ws.spec["calibration"]["data"]["path"] = str(ws.data)
    return write


def spec_bytes(content: bytes):
    def write(ws):
        (ws.root / "spec.json").write_bytes(content)
    return write


def spec_change(update):
    def change(ws):
        update(ws.spec)
    return change


def config_text(text: str):
    def write(ws):
        (ws.model / "config.json").write_text(text)
    return write


# case -> (how to break the workspace, a fragment the one-line error must contain)
CASES = {
    "empty config.json": (config_text(""), "config.json"),
    "garbage config.json": (config_text("{not json"), "config.json"),
    "unknown model_type": (config_text(json.dumps({"model_type": "no_such_family"})), "config.json"),
    "truncated safetensors": (lambda ws: ws.weights.write_bytes(ws.weights.read_bytes()[:1000]), "model.safetensors"),
    "empty safetensors": (lambda ws: ws.weights.write_bytes(b""), "model.safetensors"),
    "garbage safetensors": (lambda ws: ws.weights.write_bytes(b"\x00\xff" * 500), "model.safetensors"),
    "wrong-shape tensor": (wrong_shape, "up_proj.weight"),
    "missing tensor": (missing_tensor, "missing"),
    "NaN weight": (nan_weight, "NaN"),
    "no weights": (lambda ws: ws.weights.unlink(), "model"),
    "blocked pickle": (blocked_pickle, "pytorch_model.bin"),
    "bad jsonl line": (data_file("rows.jsonl", b'{"text": "fine"}\n{"text": \n'), "rows.jsonl"),
    "null text field": (data_file("rows.jsonl", b'{"text": "fine"}\n{"text": null}\n'), "rows.jsonl"),
    "binary txt": (data_file("binary.txt", bytes(range(256)) * 50), "binary.txt"),
    "bad gz": (data_file("text.txt.gz", b"not gzip at all"), "text.txt.gz"),
    "empty gz": (data_file("empty.txt.gz", gzip.compress(b"")), "empty.txt.gz"),
    "bad parquet": (data_file("rows.parquet", b"PAR1 garbage"), "rows.parquet"),
    "empty data": (data_file("empty.txt", b""), "empty.txt"),
    "data is a folder": (lambda ws: ws.spec["calibration"]["data"].update(path=str(ws.model)), "folder"),
    "binary spec": (spec_bytes(bytes(range(256))), "spec.json"),
    "utf-16 spec": (spec_bytes(json.dumps({"model": {"path": "x"}}).encode("utf-16")), "spec.json"),
    "5000-deep spec": (spec_bytes(b"[" * 5000 + b"]" * 5000), "spec.json"),
    "over-long path": (spec_change(lambda s: s["model"].update(path="/" + "x" * 5000)), "model.path"),
    "huge batch_size": (spec_change(lambda s: s["calibration"].update(batch_size=1e30)), "calibration.batch_size"),
    "pass arg of the wrong type": (spec_change(lambda s: s.update(passes=[{"name": "plan"}, {"name": "prune"},
        {"name": "materialize"}, {"name": "verify", "args": {"tolerance": "abc"}}])), "tolerance"),
    "unknown pass argument": (spec_change(lambda s: s.update(passes=[{"name": "plan", "args": {"speed": 1}}])), "speed"),
    "unknown pass": (spec_change(lambda s: s.update(passes=[{"name": "plan"}, {"name": "sharpen"}])), "sharpen"),
    "distill pass without a distill section": (spec_change(lambda s: s.update(passes=[
        {"name": "plan"}, {"name": "prune"}, {"name": "materialize"}, {"name": "distill"}])), "distill"),
    "cuda on a machine without": (spec_change(lambda s: s["model"].update(device="cuda")), "model.device"),
    "plugin named ''": (spec_change(lambda s: s.update(plugins=[""])), "plugins"),
    "plugin named '.x'": (spec_change(lambda s: s.update(plugins=[".x"])), "plugins"),
    "unknown local-looking model name": (spec_change(lambda s: s["model"].update(path="abc")), "abc"),
    "hub dataset while offline": (spec_change(lambda s: s["calibration"].update(
        data={"dataset": "no-such-user/no-such-dataset"})), "no-such-user/no-such-dataset"),
    "empty targets": (spec_change(lambda s: s.update(targets={})), "targets"),
    "budget above the model": (spec_change(lambda s: s.update(targets={"params": 10**12})), "targets.params"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_corrupt_input_is_one_clear_error_and_nothing_is_written(case, pristine, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    ws = Workspace(tmp_path, pristine)
    before = hashes(ws.model)
    breaking, fragment = CASES[case]
    breaking(ws)
    broken = hashes(ws.model)
    result = runner.invoke(app, ["apply", str(ws.spec_file()), "--force"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    message = "".join(result.output[result.output.index("error:"):].split())  # the console wraps long lines
    assert len(errors) == 1 and "".join(fragment.split()) in message, result.output
    assert not ws.output.exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "leftovers beside the output"
    assert hashes(ws.model) == broken  # the run never writes into the model
    assert before  # the copy was made



PIPELINE_CASES = ["pass arg of the wrong type", "unknown pass argument", "unknown pass",
                  "distill pass without a distill section", "cuda on a machine without"]


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_a_dry_run_checks_the_full_runs_pipeline_and_device(case, pristine, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    ws = Workspace(tmp_path, pristine)
    CASES[case][0](ws)
    result = runner.invoke(app, ["apply", str(ws.spec_file()), "--dry-run"])
    assert result.exit_code == 2 and "".join(CASES[case][1].split()) in "".join(result.output.split()), result.output


def test_pass_arguments_are_validated_and_coerced_before_running():
    from graphprune.pipeline import PipelineError, check_pipeline, load_passes
    from graphprune.spec import parse_spec

    load_passes([])
    spec = parse_spec({"model": {"path": "x"}})
    steps = check_pipeline(spec, [("plan", {}), ("prune", {}), ("materialize", {}), ("verify", {"tolerance": "0.5"})])
    assert steps[-1] == ("verify", {"tolerance": 0.5})
    with pytest.raises(PipelineError, match=r"passes\[3\].args of pass 'verify': tolerance: .*arguments it takes: "
                                            r"tolerance"):
        check_pipeline(spec, [("plan", {}), ("prune", {}), ("materialize", {}), ("verify", {"tolerance": [1]})])


def test_the_report_lists_what_was_written(pristine, tmp_path):
    ws = Workspace(tmp_path, pristine)
    ws.spec["passes"] = []
    result = runner.invoke(app, ["apply", str(ws.spec_file())])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in ws.output.iterdir()) == ["report.json"]
    assert json.loads((ws.output / "report.json").read_text())["written"] == ["report.json"]
    assert "written:" in result.output and "(report.json)" in result.output
