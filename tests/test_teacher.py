"""The committed demo teacher loads with transformers' own class and still scores what was recorded."""

import json

from graphprune.demo.check import RECORD, TEACHER, teacher_figures


def test_teacher_matches_its_recorded_figures():
    recorded = json.loads(RECORD.read_text())
    figures = teacher_figures()
    assert figures["settings"] == recorded["settings"]
    margin = recorded["margins"]
    assert abs(figures["perplexity"] / recorded["perplexity"] - 1) <= margin["perplexity_relative"]
    for name, accuracy in recorded["probes"].items():
        assert abs(figures["probes"][name] - accuracy) <= margin["probe_absolute"], name


def test_teacher_is_a_real_language_model_that_learned_the_probes():
    summary = json.loads((TEACHER / "training_summary.json").read_text())
    assert summary["model_class"] == "NemotronHForCausalLM"
    assert summary["val_perplexity"] < summary["unigram_val_perplexity"] / 5
    recorded = json.loads(RECORD.read_text())["probes"]  # re-measured by the test above
    assert min(recorded.values()) > 0.9  # MQAR, induction and selective copy at 256 tokens (chance < 0.01)
