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
