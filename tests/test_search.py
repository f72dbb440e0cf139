"""`graphprune search`: budgeted enumeration, analytic counts, the choice, the report, resume."""

import json
import subprocess
import sys

import pytest
import torch

import graphprune.search as search
from checkpoints import nemotron_h_config, write_checkpoint, write_text
from graphprune import analyze
from graphprune.pipeline import PassContext
from graphprune.planning import plan_sizes, pruned_config
from graphprune.search import Candidate, SearchError, choose, enumerate_candidates, spearman
from graphprune.spec import TargetsSpec, parse_spec


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    model = write_checkpoint(nemotron_h_config("M-M*-M-"), root / "model")
    return {"root": root, "model": model, "text": write_text(root / "text.txt"), "analysis": analyze(str(model))}


def spec_for(workspace, name, budget_fraction=0.75, **search_options):
    params = workspace["analysis"].params
    return parse_spec({
        "model": {"path": str(workspace["model"])},
        "calibration": {"data": {"path": str(workspace["text"])}, "num_samples": 4, "seq_len": 32},
        "importance": {"depth": "cosine", "depth_samples": 4},
        "targets": {"params": int(params * budget_fraction)},
        "search": {"max_candidates": 6, "top_k": 2, "eval_sequences": 4,
                   "bench": {"input_len": 8, "output_len": 3, "repeats": 1, "threads": 1}, **search_options},
        "distill": {"seq_len": 32, "micro_batch_size": 2, "steps": 2, "lr": 1e-3},
        "output": str(workspace["root"] / name)})


def test_every_candidate_fits_the_budget_and_the_constraints_and_counts_exactly(workspace):
    analysis = workspace["analysis"]
    spec = spec_for(workspace, "enumerate", max_candidates=100)
    depth = torch.tensor([0.5, 0.1, 0.4, 0.9, 0.2, 0.3, 0.6])  # layer 1 and 4 are the cheapest to drop
    candidates, enumerated, within = enumerate_candidates(analysis, spec, depth)
    budget = spec.targets.params
    assert enumerated == 5 * 5 * 3 * 3 and within == len(candidates) > 3  # hidden, FFN, Mamba heads (8, 6, 4), layers
    base = PassContext(spec=spec, analysis=analysis, depth_scores=depth)
    base.spec = spec.model_copy(update={"importance": spec.importance.model_copy(
        update={"hidden": "magnitude", "ffn": "magnitude", "mamba": "magnitude", "attention": "magnitude"})})
    for candidate in candidates:
        assert 0.9 * budget <= candidate.params <= budget
        plan_sizes(analysis, TargetsSpec(**candidate.targets))  # raises on a broken constraint
        assert candidate.config["mamba_num_heads"] % 2 == 0  # balanced over n_groups = 2
        model = search._materialize(base, candidate)
        assert sum(p.numel() for p in model.parameters()) == candidate.params
        assert model.config.num_hidden_layers == candidate.config["num_hidden_layers"]


def test_search_picks_the_best_loss_and_writes_the_report(workspace):
    spec = spec_for(workspace, "run", loss_tolerance=0.0)
    spec_file = workspace["root"] / "search.json"
    spec_file.write_text(spec.model_dump_json(exclude_none=True))
    done = subprocess.run([sys.executable, "-m", "graphprune.cli", "search", str(spec_file), "--json"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert len(result["candidates"]) == 6
    assert all(c["params"] <= spec.targets.params for c in result["candidates"])
    distilled = [c for c in result["candidates"] if c["kd_loss"] is not None]
    assert len(distilled) == 2 and all(c["tokens_per_s"] > 0 for c in distilled)
    zero_shot = sorted(c["zero_shot_loss"] for c in result["candidates"])
    assert sorted(c["zero_shot_loss"] for c in distilled) == zero_shot[:2]  # the top K by zero-shot loss
    best = min(distilled, key=lambda c: c["kd_loss"])
    assert (result["best"]["config"], result["best"]["params"]) == (best["config"], best["params"])
    out = workspace["root"] / "run"
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "loss after short KD" in (out / "search.md").read_text()
    assert (out / result["best"]["folder"] / "config.json").is_file()


def test_a_resumed_search_does_not_redo_measured_candidates(workspace, monkeypatch):
    calls = {"zero_shot": 0, "distill": 0}
    measure, short_distill = search.heldout_loss, search._short_distill

    def counting_loss(*args, **kwargs):
        calls["zero_shot"] += 1
        return measure(*args, **kwargs)

    def counting_distill(*args, **kwargs):
        calls["distill"] += 1
        return short_distill(*args, **kwargs)

    monkeypatch.setattr(search, "heldout_loss", counting_loss)
    monkeypatch.setattr(search, "_short_distill", counting_distill)
    spec = spec_for(workspace, "resume", top_k=1)
    first = search.run_search(spec, console=PassContext.__dataclass_fields__["console"].default_factory())
    assert calls == {"zero_shot": 6 + 1, "distill": 1}  # 6 zero-shot, 1 post-KD loss inside the short distill
    calls.update(zero_shot=0, distill=0)
    again = search.run_search(spec.model_copy(update={"search": spec.search.model_copy(update={"top_k": 2})}),
                              console=PassContext.__dataclass_fields__["console"].default_factory())
    assert calls == {"zero_shot": 1, "distill": 1}  # only the new top-2 candidate
    for key, candidate in first["candidates"].items():
        assert again["candidates"][key]["zero_shot_loss"] == candidate["zero_shot_loss"]


def test_memory_budget_counts_weights_and_inference_state(workspace):
    analysis = workspace["analysis"]
    full_params = analysis.params
    spec = parse_spec({"model": {"path": str(workspace["model"])}, "output": "unused",
                       "search": {"memory_bytes": 4 * full_params, "memory_seq_len": 100,
                                  "space": {"hidden_size": {"values": [48]}, "ffn_hidden_size": {"values": [80]},
                                            "mamba_num_heads": {"values": [8]}, "num_layers": {"values": [7]}}}})
    with pytest.raises(SearchError, match="no candidate"):  # weights alone fill the budget; the state does not fit
        enumerate_candidates(analysis, spec, None)
    # by hand: 3 Mamba layers (fp32 SSM state 8x6x8, conv state (48 + 2*2*8) x 4), 1 attention layer (K and V)
    state = 3 * (4 * 8 * 6 * 8 + 4 * (48 + 32) * 4) + 2 * 2 * 12 * 100 * 4
    roomy = spec.model_copy(update={"search": spec.search.model_copy(update={"memory_bytes": 4 * full_params + state})})
    (candidate,), _, _ = enumerate_candidates(analysis, roomy, None)
    assert candidate.memory_bytes == 4 * full_params + state


def test_search_errors_name_the_field(workspace):
    spec = spec_for(workspace, "errors")
    with pytest.raises(SearchError, match=r"search.space.mamba_num_heads: .*multiple of 2"):
        enumerate_candidates(workspace["analysis"], spec.model_copy(update={"search": spec.search.model_copy(
            update={"space": {"mamba_num_heads": parse_spec({"model": {"path": "x"}, "search": {"space": {
                "mamba_num_heads": {"values": [8, 5]}}}}).search.space["mamba_num_heads"]}})}), None)
    no_budget = spec.model_copy(update={"targets": TargetsSpec()})
    with pytest.raises(SearchError, match="exactly one budget"):
        enumerate_candidates(workspace["analysis"], no_budget, None)
    with pytest.raises(SearchError, match="remove hidden_size"):
        search._budget(spec.model_copy(update={"targets": TargetsSpec(hidden_size=32)}))


def test_choice_breaks_loss_ties_by_throughput_and_rank_correlation():
    slow = Candidate(targets={"a": 1}, params=1, kd_loss=2.000, tokens_per_s=10.0)
    fast = Candidate(targets={"a": 2}, params=1, kd_loss=2.005, tokens_per_s=20.0)
    worse = Candidate(targets={"a": 3}, params=1, kd_loss=2.100, tokens_per_s=99.0)
    assert choose([slow, fast, worse], tolerance=0.005) is fast
    assert choose([slow, fast, worse], tolerance=0.0) is slow
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def test_the_8b_search_plans_on_meta_and_counts_like_transformers():
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from graphprune.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parent.parent / "specs" / "search-8b.json")
    plan = search.plan_search(spec)
    budget = spec.targets.params
    assert plan["within_budget"] > 100 and len(plan["candidates"]) == spec.search.max_candidates
    for candidate in plan["candidates"]:
        assert 0.9 * budget <= candidate["params"] <= budget
        assert candidate["config"]["mamba_num_heads"] % 8 == 0  # n_groups = 8
    analysis = analyze(spec.model.path, meta=True)
    candidate = min(plan["candidates"], key=lambda c: c["config"]["num_hidden_layers"])  # one that drops layers
    dropped = list(range(candidate["config"]["num_hidden_layers"], len(analysis.layers)))  # the last ones
    config = pruned_config(analysis, plan_sizes(analysis, TargetsSpec(**candidate["targets"])).sizes, dropped)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == candidate["params"]
