"""`graphprune inspect` as a user runs it."""

import json
import subprocess
import sys

from typer.testing import CliRunner

from graphprune.cli import app

runner = CliRunner()
TINY = "specs/models/tiny-nemotron-h.json"


def test_inspect_json_is_one_object_with_the_documented_fields():
    result = runner.invoke(app, ["inspect", TINY, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data["params"], int) and data["params"] > 0
    config = json.load(open(TINY))
    kind_of = {"M": "mamba", "-": "mlp", "*": "attention"}
    assert [layer["kind"] for layer in data["layers"]] == [kind_of[c] for c in config["hybrid_override_pattern"]]
    for group in data["groups"]:
        assert {"name", "kind", "layer", "size", "balanced_groups", "unit", "params"} <= set(group)
    heads = next(g for g in data["groups"] if g["name"] == "layers.0.mamba.heads")
    assert heads["kind"] == "mamba_heads" and heads["size"] == config["mamba_num_heads"]
    assert heads["balanced_groups"] == config["n_groups"] and heads["unit"] == config["mamba_head_dim"]
    attention = next(g for g in data["groups"] if g["kind"] == "attention_heads")
    assert (attention["size"], attention["balanced_groups"]) == (config["num_attention_heads"], config["num_key_value_heads"])


def test_inspect_table_and_error_exit_code():
    result = runner.invoke(app, ["inspect", TINY])
    assert result.exit_code == 0
    assert "layers.*.mamba.heads" in result.stdout and "parameters:" in result.stdout
    missing = runner.invoke(app, ["inspect", "no/such/model.json"])
    assert missing.exit_code == 2
    assert "error:" in missing.output


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "graphprune.cli", "inspect", TINY, "--json"],
                         capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["params"] == json.loads(runner.invoke(app, ["inspect", TINY, "--json"]).stdout)["params"]


def test_apply_dry_run_json_and_schema(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model": {"path": str(__import__("pathlib").Path(TINY).resolve())},
                                "targets": {"hidden_size": 64, "mamba_num_heads": 4}}))
    result = runner.invoke(app, ["apply", str(spec), "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["original"]["config"]["hidden_size"] == 128 and report["pruned"]["config"]["hidden_size"] == 64
    assert report["pruned"]["config"]["mamba_num_heads"] == 4
    assert report["pruned"]["params"] < report["original"]["params"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"path": TINY}, "targets": {"mamba_num_heads": 5}}))
    refused = runner.invoke(app, ["apply", str(bad), "--dry-run"])
    assert refused.exit_code == 2 and "not a multiple of 2" in refused.output
    schema = runner.invoke(app, ["schema"])
    assert json.loads(schema.stdout)["title"] == "Spec"


def test_eval_raw_join_scores_the_file_as_one_stream(tmp_path):
    from checkpoints import DEMO, write_text
    from graphprune.data import load_tokenizer
    from graphprune.evaluate import text_tokens, uses_demo_tokenizer

    text = write_text(tmp_path / "held.txt", chars=4000)
    tokenizer = load_tokenizer(str(DEMO))
    raw = text_tokens(tokenizer, text, 10_000, join="raw")
    assert raw.tolist() == tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    documents = text_tokens(tokenizer, text, 10_000)
    assert (documents == tokenizer.eos_token_id).sum() >= 2 and (raw == tokenizer.eos_token_id).sum() == 0
    assert uses_demo_tokenizer(tokenizer)
