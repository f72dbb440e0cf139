"""Planning: nested Mamba scoring, the paper's 8B -> 4B target on meta, and refused targets."""

import json

import pytest
import torch

from checkpoints import llama_config, mamba2_config, nemotron_h_config, write_checkpoint, write_text
from graphprune import analyze
from graphprune.apply import apply
from graphprune.data import DataError
from graphprune.families import FamilyMismatch
from graphprune.groups import Group, LayoutFactor, ParamSlice
from graphprune.importance import ActivationSite, mamba_scores
from graphprune.planning import PlanError, choose_units, count_params, plan_sizes
from graphprune.spec import SpecError, load_spec, parse_spec
from graphprune.trace import LoadError


def test_nested_scoring_ranks_heads_on_kept_channels_only():
    # 2 B/C groups x 2 heads x head_dim 3. Head 0 is strong only on channel 2, which is pruned.
    s = torch.tensor([[0.0, 0.0, 3.0], [1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [2.1, 2.1, 0.0]])
    layout = (LayoutFactor("g", 2, True), LayoutFactor("heads", 2), LayoutFactor("head_dim", 3))
    piece = ParamSlice("in_proj.weight", 0, 12, 24, layout)
    heads = Group("heads", "mamba_heads", 0, size=4, unit=3, balanced_groups=2, params=0, slices=[piece])
    head_dim = Group("head_dim", "mamba_head_dim", 0, size=3, unit=1, balanced_groups=1, params=0, slices=[piece])
    site = ActivationSite("in_proj", False, piece)
    stats = {site.key: s.flatten()}
    nested, channels = mamba_scores(heads, head_dim, [site], stats, keep_channels=2, nested=True)
    flat, _ = mamba_scores(heads, head_dim, [site], stats, keep_channels=2, nested=False)
    assert choose_units(head_dim, channels, 2) == [0, 1]
    assert choose_units(heads, nested, 2) == [1, 3]      # head 1 wins group 0 on the kept channels
    assert choose_units(heads, flat, 2) == [0, 3]        # at full head_dim, head 0 would have won


def test_paper_8b_to_4b_plan_on_meta_matches_transformers_count():
    from transformers import AutoModelForCausalLM

    spec = load_spec("specs/nemotron-h-8b-to-4b.json")
    report = apply(spec, dry_run=True)
    assert report["original"]["params"] == 8_100_852_736
    assert report["pruned"]["params"] == 4_489_223_040
    config = report["pruned"]["config"]
    assert (config["hidden_size"], config["intermediate_size"], config["mamba_num_heads"]) == (3072, 12288, 112)
    assert (config["mamba_head_dim"], config["num_hidden_layers"]) == (64, 52)
    analysis = analyze("specs/models/nemotron-h-8b.json")
    plan = plan_sizes(analysis, spec.targets)
    from graphprune.planning import kind_sizes
    pruned = analysis.family.pruned_config(analysis.model.config, kind_sizes(analysis, plan.sizes), list(range(52)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(pruned)
    assert model.num_parameters() == count_params(analysis, plan.sizes) == 4_489_223_040


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("refuse")
    return {"root": root, "model": write_checkpoint(nemotron_h_config(), root / "model"),
            "mamba2": write_checkpoint(mamba2_config(), root / "mamba2"), "text": write_text(root / "text.txt")}


def spec_for(checkpoint, targets, model="model", **extra):
    return parse_spec({"model": {"path": str(checkpoint[model])},
                       "calibration": {"data": {"path": str(checkpoint["text"])}, "num_samples": 4, "seq_len": 32},
                       "targets": targets, "output": str(checkpoint["root"] / "out"), **extra})


@pytest.mark.parametrize("targets,message", [
    ({"hidden_size": 64}, "larger than hidden's 48"),
    ({"mamba_num_heads": 3}, "not a multiple of 2"),
    ({"num_attention_heads": 3}, "balanced over 2 groups (kv_heads=2)"),
    ({"mamba_head_dim": 7}, "larger than"),
    ({"num_layers": 9}, "more than the model's 5 layers"),
    ({"groups": {"layers.1.ffn": 40}}, "one size per layer kind"),
])
def test_infeasible_targets_are_refused_before_any_work(checkpoint, targets, message):
    with pytest.raises(PlanError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply(spec_for(checkpoint, targets), force=True)
    assert not (checkpoint["root"] / "out").exists()


def test_family_rules_are_refused_before_any_work(checkpoint, tmp_path):
    with pytest.raises(FamilyMismatch, match="multiple of hidden_size"):
        apply(spec_for(checkpoint, {"hidden_size": 24}, model="mamba2"), force=True)
    llama = write_checkpoint(llama_config(), tmp_path / "llama")
    with pytest.raises(FamilyMismatch, match="not a multiple of the number of attention heads"):
        apply(spec_for({**checkpoint, "llama": llama}, {"hidden_size": 32}, model="llama"), force=True)
    assert not (checkpoint["root"] / "out").exists()


def test_unknown_keys_name_the_path_and_the_valid_fields():
    with pytest.raises(SpecError) as info:
        parse_spec({"model": {"path": "x"}, "targets": {"mamba_heads": 4}})
    assert "targets.mamba_heads: unknown field" in str(info.value)
    assert "mamba_num_heads" in str(info.value)
    with pytest.raises(SpecError, match="importance.depth"):
        parse_spec({"model": {"path": "x"}, "importance": {"depth": "l2"}})


def test_missing_files_and_mismatched_tokenizer(checkpoint, tmp_path):
    with pytest.raises(LoadError):
        apply(parse_spec({"model": {"path": str(tmp_path / "missing")}, "output": str(tmp_path / "o")}))
    bad_data = spec_for(checkpoint, {"hidden_size": 32}).model_copy()
    bad_data.calibration.data.path = str(tmp_path / "nothing.txt")
    with pytest.raises(DataError, match="does not exist"):
        apply(bad_data, force=True)
    small_vocab = nemotron_h_config()
    small_vocab.vocab_size = 96
    write_checkpoint(small_vocab, tmp_path / "small")
    spec = spec_for({**checkpoint, "model": tmp_path / "small"}, {"hidden_size": 32})
    with pytest.raises(DataError, match="4096 tokens but the model's vocabulary has 96"):
        apply(spec, force=True)


def test_schema_file_is_current():
    from graphprune.spec import json_schema

    assert json.load(open("specs/schema.json")) == json_schema()


def test_plugin_pass_runs_from_a_spec(checkpoint):
    spec = spec_for(checkpoint, {"ffn_hidden_size": 40}, plugins=["plugin_pass"], importance={"ffn": "magnitude",
                    "hidden": "magnitude", "mamba": "magnitude", "attention": "magnitude"},
                    passes=[{"name": "plan"}, {"name": "count_pruned_ffn", "args": {"label": "demo"}},
                            {"name": "prune"}, {"name": "materialize"}, {"name": "verify"}])
    report = apply(spec, force=True)
    plugin = next(p for p in report["passes"] if p["name"] == "count_pruned_ffn")
    assert plugin["label"] == "demo" and plugin["pruned_units"] == 2 * (80 - 40)
    assert (checkpoint["root"] / "out" / "model.safetensors").is_file()


def smollm_like_config(folder):
    """A Llama shaped like SmolLM2 (9 query / 3 KV heads, so Llama's config wants hidden % 9 == 0), on meta."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    return folder / "config.json"


@pytest.mark.parametrize("family", ["llama", "nemotron_h", "mamba2"])
@pytest.mark.parametrize("fraction", [0.9, 0.8, 0.6, 0.45])
def test_budget_yields_configs_the_family_validates_within_the_budget(tmp_path, family, fraction):
    from graphprune.planning import kind_sizes

    if family == "llama":
        source = smollm_like_config(tmp_path / "llama")
    else:
        config = nemotron_h_config() if family == "nemotron_h" else mamba2_config()
        config.save_pretrained(tmp_path / family)
        source = tmp_path / family / "config.json"
    analysis = analyze(str(source), meta=True)
    budget = int(analysis.params * fraction)
    try:
        plan = plan_sizes(analysis, parse_spec({"model": {"path": "x"}, "targets": {"params": budget}}).targets)
    except PlanError as err:  # a budget below what widths alone reach is refused with the smallest size
        assert "below the smallest valid model" in str(err) and fraction <= 0.6
        return
    assert count_params(analysis, plan.sizes) <= budget
    config = analysis.family.pruned_config(analysis.model.config, kind_sizes(analysis, plan.sizes),
                                           list(range(len(analysis.layers))))
    rebuilt = type(config).from_dict(config.to_dict())   # the family's own validation, as from_pretrained runs it
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM
        assert AutoModelForCausalLM.from_config(rebuilt).num_parameters() == count_params(analysis, plan.sizes)
    if family == "llama":
        assert rebuilt.hidden_size % rebuilt.num_attention_heads == 0


def test_budget_with_pinned_axes_keeps_them_and_fits(tmp_path):
    analysis = analyze(str(smollm_like_config(tmp_path / "llama")), meta=True)
    budget = int(analysis.params * 0.8)
    targets = parse_spec({"model": {"path": "x"}, "targets": {"params": budget, "num_attention_heads": 6}}).targets
    plan = plan_sizes(analysis, targets)
    assert all(plan.sizes[g.name] == 6 for g in analysis.groups_of_kind("attention_heads"))
    assert 0.97 * budget <= count_params(analysis, plan.sizes) <= budget
    with pytest.raises(SpecError, match="num_layers"):
        parse_spec({"model": {"path": "x"}, "targets": {"params": budget, "num_layers": 1}})


def test_budget_splits_all_fit_and_the_split_is_chosen_by_loss(tmp_path):
    """The demo teacher with its FFNs made dead (down_proj zero): the budget is best spent by cutting the FFN
    and keeping hidden and Mamba heads, which the common shrink factor cannot see."""
    import shutil

    from safetensors.torch import load_file, save_file

    from checkpoints import DEMO
    from graphprune.search import budget_splits

    folder = shutil.copytree(DEMO / "teacher", tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    for name in weights:
        if name.endswith("down_proj.weight"):
            weights[name] = torch.zeros_like(weights[name])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    analysis = analyze(str(folder))
    budget = int(analysis.params * 0.75)
    targets = parse_spec({"model": {"path": "x"}, "targets": {"params": budget}}).targets
    splits = budget_splits(analysis, targets, limit=6)
    assert 1 < len(splits) <= 6 and len({json.dumps(s.targets, sort_keys=True) for s in splits}) == len(splits)
    for split in splits:
        sizes = plan_sizes(analysis, parse_spec({"model": {"path": "x"}, "targets": split.targets}).targets).sizes
        assert 0.85 * budget <= count_params(analysis, sizes) == split.params <= budget
    report = apply(parse_spec({"model": {"path": str(folder)}, "targets": {"params": budget},
                               "calibration": {"data": {"path": str(DEMO / "corpus" / "train.txt.gz")},
                                               "num_samples": 8, "seq_len": 128},
                               "importance": {"ffn": "magnitude"}, "output": str(tmp_path / "out")}))
    chosen = report["budget_split"]
    losses = [c["loss"] for c in chosen["candidates"]]
    assert chosen["chosen"] == chosen["candidates"][losses.index(min(losses))]["targets"]
    assert min(losses) < losses[0]  # the common factor (first) is beaten
    assert chosen["chosen"]["ffn_hidden_size"] < chosen["common_factor"]["ffn_hidden_size"]
    assert report["pruned"]["params"] <= budget
    assert report["pruned"]["config"]["intermediate_size"] == chosen["chosen"]["ffn_hidden_size"]
