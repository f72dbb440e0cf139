"""Export formats and bench engines are registries: a plugin module adds its own, used through `apply`."""

import json

import pytest

from checkpoints import nemotron_h_config, write_checkpoint
from graphprune.apply import apply
from graphprune.errors import UserError
from graphprune.spec import parse_spec

MAGNITUDE = {"hidden": "magnitude", "ffn": "magnitude", "mamba": "magnitude", "attention": "magnitude"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    return {"root": root, "model": write_checkpoint(nemotron_h_config(), root / "model")}


def spec_for(checkpoint, **sections):
    return parse_spec({"model": {"path": str(checkpoint["model"])}, "importance": MAGNITUDE, "plugins": ["plugin_backends"],
                       "targets": {"ffn_hidden_size": 40}, "output": str(checkpoint["root"] / "out"), **sections})


def test_a_plugin_format_and_engine_run_in_apply(checkpoint):
    spec = spec_for(checkpoint, export={"formats": ["summary", "hf"], "options": {"summary": {"note": "toy"}}},
                    bench={"engines": ["sleep"], "options": {"sleep": {"seconds_per_billion": 1.0}},
                           "input_len": 8, "output_len": 2, "repeats": 1})
    report = apply(spec, force=True)
    out = checkpoint["root"] / "out"
    written = json.loads((out / "export" / "summary" / "summary.json").read_text())
    assert written == {"params": report["pruned"]["params"], "note": "toy"}
    assert (out / "export" / "hf" / "config.json").is_file()
    results = report["bench"]["sleep"]["results"]
    assert [r["engine"] for r in results] == ["sleep", "sleep"]  # the worker found the plugin's engine
    assert results[0]["params"] == report["original"]["params"] > results[1]["params"] == report["pruned"]["params"]
    assert all(r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in results)


@pytest.mark.parametrize("sections,message", [
    ({"export": {"formats": ["tflite"]}}, "export.formats[0]: unknown export format 'tflite'; registered: hf, onnx, "
                                          "summary, trtllm"),
    ({"export": {"formats": ["summary"], "options": {"summary": {"note": 3}}}}, "export.options.summary: note"),
    ({"export": {"formats": ["onnx"], "options": {"trtllm": {"num_requests": 4}}}},
     "export.options.trtllm: 'trtllm' is not in export.formats"),
    ({"bench": {"engines": ["sleep"], "options": {"sleep": {"speed": 1}}}}, "bench.options.sleep: speed"),
    ({"bench": {"engines": ["vllm"]}}, "bench.engines[0]: unknown bench engine 'vllm'; registered: onnxruntime, "
                                      "sleep, torch, trtllm"),
])
def test_unknown_back_ends_and_bad_options_fail_before_anything_runs(checkpoint, sections, message):
    with pytest.raises(UserError) as err:
        apply(spec_for(checkpoint, **sections), dry_run=True)
    assert message in str(err.value)


def test_trtllm_options_written_beside_formats_still_parse():
    spec = parse_spec({"model": {"path": "m"}, "export": {"formats": ["trtllm"], "num_requests": 8}})
    assert spec.export.options == {"trtllm": {"num_requests": 8}}


def test_export_of_a_missing_folder_names_it_and_writes_nothing(tmp_path):
    from graphprune.export import ExportError, export_path

    with pytest.raises(ExportError, match="no such model folder"):
        export_path(str(tmp_path / "missing"), "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
