"""The demo's probes and `graphprune eval`."""

import json

import pytest
import torch
from typer.testing import CliRunner

from checkpoints import nemotron_h_config, write_checkpoint, write_text
from graphprune.cli import app
from graphprune.demo import probes as P


@pytest.mark.parametrize("name", P.PROBES)
def test_probes_are_deterministic_under_a_seed(name):
    a, b, c = (P.make_probe(name, 4, 128, seed) for seed in (7, 7, 8))
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_mqar_labels_are_the_values_of_the_queried_keys():
    batch = P.make_mqar(8, 128, seed=3, num_kv=8)
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        pairs = {ids[1 + 2 * i]: ids[2 + 2 * i] for i in range(8)}
        scored = [t for t, label in enumerate(targets) if label != P.IGNORE]
        assert scored and all(targets[t] == pairs[ids[t]] for t in scored)
        assert all(ids[t + 1] == targets[t] for t in scored)  # the answer follows the query


def test_induction_and_copy_labels_repeat_what_came_before():
    batch = P.make_induction(4, 65, seed=1)
    half = 32
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        for t, label in enumerate(targets):
            if label != P.IGNORE:
                assert label == ids[t + 1] == ids[t + 1 - half]
    batch = P.make_copy(4, 96, seed=1, num_tokens=6)
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        recall = ids.index(P.RECALL)
        content = [t for t in ids[1:recall] if t != P.NOISE]
        assert [label for label in targets if label != P.IGNORE] == content


def test_perfect_logits_score_one_and_wrong_logits_zero():
    batch = P.make_mqar(2, 64, seed=0, num_kv=4)
    logits = torch.zeros(2, 64, 4096)
    mask = batch.mask
    logits[mask, batch.targets[mask]] = 1.0
    assert P.probe_accuracy(logits, batch.targets) == 1.0
    assert P.probe_accuracy(torch.zeros(2, 64, 4096), batch.targets) == 0.0


def test_eval_json_parses(tmp_path):
    model = write_checkpoint(nemotron_h_config(), tmp_path / "model")
    text = write_text(tmp_path / "valid.txt", 20_000)
    result = CliRunner().invoke(app, ["eval", str(model), "--data", str(text), "--json", "--max-tokens", "1024",
                                      "--samples", "4", "--seq-len", "64"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert isinstance(data["perplexity"], float) and data["perplexity"] > 1
    assert set(data["probes"]) == {"mqar", "induction", "copy"}
    assert all(0.0 <= v <= 1.0 for v in data["probes"].values())
