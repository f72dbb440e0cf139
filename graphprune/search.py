"""`graphprune search`: pick a pruned shape under a budget, the paper's way.

1. Importance once: activation scores (calibrate) and, when layers may be dropped, depth scores.
2. Enumerate every combination of the axis sizes (constraint-respecting), count each candidate's
   parameters analytically (no weights built) and keep those within
   ``[min_budget_fraction x budget, budget]``; at most ``max_candidates``, spread over parameter counts.
3. Zero-shot held-out loss of every candidate (each built in memory from the shared scores).
4. The ``top_k`` by zero-shot loss get the same short distillation (the spec's `distill` section),
   then their held-out loss again, and their speed with the bench engine.
5. The winner has the lowest post-KD loss; losses within ``loss_tolerance`` tie and throughput
   decides.  Optionally the winner is distilled further into ``<output>/winner``.

Everything measured goes into ``<output>/search.json`` as soon as it is measured, so an interrupted
search resumes where it stopped (measurements are reused only for the same model, data and spec).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .api import Analysis, analyze
from .distill import distill_in_process, heldout_loss
from .pipeline import PASSES, PassContext, PipelineError, load_passes
from .planning import PlanError, count_params, drop_lowest, plan_sizes, size_step, valid_sizes
from .spec import SEARCH_AXES, AxisSpace, Spec, TargetsSpec

SEARCH_FILE = "search.json"
AXIS_KINDS = {"hidden_size": "hidden", "ffn_hidden_size": "ffn", "mamba_num_heads": "mamba_heads",
              "mamba_head_dim": "mamba_head_dim", "num_attention_heads": "attention_heads"}
DEFAULT_FRACTIONS = {"hidden_size": (1, 0.875, 0.75, 0.625, 0.5), "ffn_hidden_size": (1, 0.875, 0.75, 0.625, 0.5),
                     "mamba_num_heads": (1, 0.875, 0.75, 0.625, 0.5), "num_layers": (1, 0.875, 0.75)}


class SearchError(PipelineError):
    """The search cannot run as specified; the message names the field."""


@dataclass
class Candidate:
    targets: dict[str, int]             # the spec target keys of this shape
    params: int
    memory_bytes: int | None = None
    config: dict[str, int] = field(default_factory=dict)
    zero_shot_loss: float | None = None
    kd_loss: float | None = None        # held-out LM loss after the short distillation
    kd_kl: float | None = None          # held-out KD (KL) loss at the end of the short distillation
    tokens_per_s: float | None = None   # generated tokens / (prefill + decode) time
    relative_throughput: float | None = None  # tokens_per_s / the original model's
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return "-".join(f"{k}={v}" for k, v in sorted(self.targets.items()))


# ------------------------------------------------------------------------------------------ enumeration


def axis_values(analysis: Analysis, axis: str, space: AxisSpace | None) -> list[int]:
    """Sizes to try on `axis`, largest first, each checked against the analysis' constraints."""
    full = len(analysis.layers) if axis == "num_layers" else _axis_group(analysis, axis).size
    unit = 1 if axis == "num_layers" else _axis_group(analysis, axis).balanced_groups
    if space is not None and space.values is not None:
        values = space.values
    elif space is not None:
        step = space.step or unit
        values = list(range(space.max or full, (space.min or step) - 1, -step))
    elif axis in DEFAULT_FRACTIONS:
        step = 1 if axis == "num_layers" else size_step(_axis_group(analysis, axis))
        values = [max(step, int(full * f) // step * step) for f in DEFAULT_FRACTIONS[axis]]
    else:
        values = [full]
    values = sorted(set(values), reverse=True)
    for value in values:
        try:
            plan_sizes(analysis, TargetsSpec(**{axis: value}))
        except (PlanError, ValueError) as err:
            raise SearchError(f"search.space.{axis}: {err}") from None
    return values


BUDGET_AXES = ("hidden_size", "ffn_hidden_size", "mamba_num_heads")  # what a params budget may trade


def budget_splits(analysis: Analysis, targets: TargetsSpec, limit: int) -> list[Candidate]:
    """Ways to spend `targets.params` over the width axes not pinned, as explicit targets: the one-common-
    factor split first, then at most `limit - 1` others, spread over parameter counts. Each other split
    sets all free axes but one to 50-100% of their size and grows the remaining one (the filler, each
    axis in turn) to the largest size that fits the budget; only splits the family's config accepts and
    that use at least 85% of the budget are kept."""
    pinned = {k: v for k, v in targets.model_dump(exclude_defaults=True).items() if k != "params"}
    common = plan_sizes(analysis, targets).sizes
    free = [a for a in BUDGET_AXES if a not in pinned and analysis.groups_of_kind(AXIS_KINDS[a])]
    first = Candidate(targets={**pinned, **{axis: common[_axis_group(analysis, axis).name] for axis in free}},
                      params=count_params(analysis, common))
    if limit == 1 or len(free) < 2:
        return [first]
    found: dict[str, Candidate] = {}
    for filler in free:
        others = [a for a in free if a != filler]
        every_size = axis_values(analysis, filler, AxisSpace(step=size_step(_axis_group(analysis, filler))))
        for sizes in itertools.product(*(axis_values(analysis, a, None) for a in others)):
            split = {**pinned, **dict(zip(others, sizes))}
            filled = _largest_fitting(analysis, split, filler, every_size, targets.params)
            if filled is not None and filled[0] != first.targets and filled[1] >= 0.85 * targets.params:
                candidate = Candidate(targets=filled[0], params=filled[1])
                found[candidate.key] = candidate
    return [first] + _spread(list(found.values()), limit - 1)


def _largest_fitting(analysis: Analysis, split: dict[str, Any], axis: str, sizes: list[int],
                     budget: int) -> tuple[dict[str, Any], int] | None:
    """`split` with `axis` at the largest of `sizes` (largest first) that fits `budget` and the family's config."""
    def params(index: int) -> int:
        return count_params(analysis, plan_sizes(analysis, TargetsSpec(**split, **{axis: sizes[index]})).sizes)

    low, high = 0, len(sizes)  # params fall as the index grows: find the first index that fits
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if params(middle) <= budget else (middle + 1, high)
    for index in range(low, min(low + 16, len(sizes))):  # a size the config refuses steps down
        filled = {**split, axis: sizes[index]}
        if valid_sizes(analysis, plan_sizes(analysis, TargetsSpec(**filled)).sizes):
            return filled, params(index)
    return None


def _axis_group(analysis: Analysis, axis: str):
    groups = analysis.groups_of_kind(AXIS_KINDS[axis])
    if not groups:
        raise SearchError(f"search.space.{axis}: the model has no {AXIS_KINDS[axis]} groups")
    return groups[0]


def enumerate_candidates(analysis: Analysis, spec: Spec,
                         depth_scores: torch.Tensor | None) -> tuple[list[Candidate], int, int]:
    """(candidates, at most max_candidates spread over parameter counts; shapes enumerated; shapes in budget)."""
    search = spec.search
    axes = [a for a in SEARCH_AXES if a in search.space or a in DEFAULT_FRACTIONS]
    axes = [a for a in axes if a == "num_layers" or analysis.groups_of_kind(AXIS_KINDS[a])]
    choices = {a: axis_values(analysis, a, search.space.get(a)) for a in axes}
    budget, measure = _budget(spec)
    floor = search.min_budget_fraction * budget
    fitting, total = [], 0
    for combination in itertools.product(*(choices[a] for a in axes)):
        total += 1
        targets = dict(zip(axes, combination))
        plan = plan_sizes(analysis, TargetsSpec(**targets))
        dropped = _dropped(analysis, targets.get("num_layers"), depth_scores)
        candidate = Candidate(targets=targets, params=count_params(analysis, plan.sizes, dropped))
        candidate.config = _config(analysis, plan.sizes, dropped)
        if measure == "memory":
            candidate.memory_bytes = memory_bytes(analysis, candidate, dropped, spec)
        used = candidate.memory_bytes if measure == "memory" else candidate.params
        if floor <= used <= budget:
            fitting.append(candidate)
    if not fitting:
        raise SearchError(f"no candidate of the search space uses between {search.min_budget_fraction:.0%} and 100% "
                          f"of the {measure} budget ({budget:,}); widen search.space or lower min_budget_fraction")
    return _spread(fitting, search.max_candidates), total, len(fitting)


def _budget(spec: Spec) -> tuple[int, str]:
    explicit = [k for k, v in spec.targets.model_dump().items() if v not in (None, {}, False) and k != "params"]
    if explicit:
        raise SearchError(f"targets: a search takes its sizes from search.space; remove {', '.join(explicit)}")
    if (spec.targets.params is None) == (spec.search.memory_bytes is None):
        raise SearchError("search: give exactly one budget, targets.params or search.memory_bytes")
    return (spec.targets.params, "params") if spec.targets.params is not None else (spec.search.memory_bytes, "memory")


def _dropped(analysis: Analysis, num_layers: int | None, depth_scores: torch.Tensor | None) -> list[int]:
    if num_layers is None or num_layers == len(analysis.layers):
        return []
    if depth_scores is None:
        raise SearchError("search.space.num_layers: dropping layers needs depth scores")
    return drop_lowest(depth_scores, num_layers)


def _config(analysis: Analysis, sizes: dict[str, int], dropped: list[int]) -> dict[str, int]:
    """Every family config key with its size, pruned or not, so that rows are comparable."""
    config: dict[str, int] = {}
    for group in analysis.groups:  # one size per kind: the first group of a key speaks for all
        if group.config_key and group.kind != "layer":
            config.setdefault(group.config_key, sizes[group.name])
    config[analysis.family.layer_count_key()] = len(analysis.layers) - len(dropped)
    return config


def _spread(candidates: list[Candidate], limit: int) -> list[Candidate]:
    """At most `limit` candidates, evenly spaced in parameter count (largest first)."""
    ordered = sorted(candidates, key=lambda c: (-c.params, c.key))
    if len(ordered) <= limit:
        return ordered
    step = (len(ordered) - 1) / max(limit - 1, 1)
    return [ordered[round(i * step)] for i in range(limit)]


def memory_bytes(analysis: Analysis, candidate: Candidate, dropped: list[int], spec: Spec) -> int:
    """Weights plus inference state (KV cache; SSM and conv state) at the search's batch x sequence length;
    the state is the family's memory model."""
    dtype_bytes = torch.finfo(next(analysis.model.parameters()).dtype).bits // 8
    sizes = plan_sizes(analysis, TargetsSpec(**candidate.targets)).sizes
    per_sequence = analysis.family.inference_state_bytes(analysis, sizes, dropped, spec.search.memory_seq_len,
                                                         dtype_bytes)
    return candidate.params * dtype_bytes + spec.search.memory_batch * per_sequence


# ------------------------------------------------------------------------------------------ measuring


def build_in_memory(base: PassContext, targets: dict[str, Any]) -> torch.nn.Module:
    """The pruned model of these targets, built in memory from the scores `base` holds: plan, prune,
    drop_layers, materialize (nothing written)."""
    import graphprune.passes  # noqa: F401  (registers the built-in passes)

    spec = base.spec.model_copy(update={"targets": TargetsSpec(**targets), "output": None})
    ctx = PassContext(spec=spec, analysis=base.analysis, activations=base.activations, unit_scores=base.unit_scores,
                      depth_scores=base.depth_scores, batches=base.batches, console=base.console)
    for name in ("plan", "prune", "drop_layers", "materialize"):
        PASSES[name].fn(ctx)
    return ctx.pruned_model


def _materialize(base: PassContext, candidate: Candidate) -> torch.nn.Module:
    """The candidate built in memory from the shared scores, its parameter count checked."""
    model = build_in_memory(base, candidate.targets)
    built = sum(p.numel() for p in model.parameters())
    if built != candidate.params:  # the analytic count is what the budget was checked against
        raise SearchError(f"candidate {candidate.key}: analytic count {candidate.params:,} != built {built:,}")
    return model


def spearman(first: list[float], second: list[float]) -> float | None:
    """Rank correlation of two lists of losses (no ties expected in measured losses)."""
    if len(first) < 2:
        return None
    rank = lambda xs: {i: r for r, i in enumerate(sorted(range(len(xs)), key=lambda i: xs[i]))}  # noqa: E731
    a, b = rank(first), rank(second)
    n = len(first)
    return 1 - 6 * sum((a[i] - b[i]) ** 2 for i in range(n)) / (n * (n * n - 1))


def choose(candidates: list[Candidate], tolerance: float) -> Candidate:
    """Lowest post-KD loss; candidates within `tolerance` (relative) of it tie, the fastest wins."""
    measured = [c for c in candidates if c.kd_loss is not None]
    best = min(c.kd_loss for c in measured)
    tied = [c for c in measured if c.kd_loss <= best * (1 + tolerance)]
    return max(tied, key=lambda c: (c.tokens_per_s or 0.0, -c.kd_loss))


# ------------------------------------------------------------------------------------------ the job


def fingerprint(spec: Spec) -> str:
    """What the measurements depend on: a resumed search reuses them only when this is unchanged."""
    parts = {key: spec.model_dump(mode="json")[key] for key in ("model", "calibration", "importance", "targets", "distill")}
    parts["search"] = spec.search.model_dump(mode="json", exclude={"max_candidates", "top_k", "final_distill_steps"})
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class SearchState:
    """search.json: every measurement as soon as it exists (written atomically)."""

    def __init__(self, folder: Path, key: str, console: Any):
        self.path = folder / SEARCH_FILE
        self.data: dict[str, Any] = {"fingerprint": key, "candidates": {}}
        if self.path.is_file():
            previous = json.loads(self.path.read_text())
            if previous.get("fingerprint") == key:
                self.data = previous
                console.print(f"resuming: {sum(c.get('zero_shot_loss') is not None for c in previous['candidates'].values())}"
                              f" candidates already measured in {self.path}")
            else:
                console.print(f"{self.path} is from another model, data or spec: starting afresh")

    def restore(self, candidate: Candidate) -> Candidate:
        saved = self.data["candidates"].get(candidate.key)
        if saved:
            for name in ("zero_shot_loss", "kd_loss", "kd_kl", "tokens_per_s", "relative_throughput", "seconds"):
                setattr(candidate, name, saved[name])
        return candidate

    def save(self, candidates: list[Candidate], **extra: Any) -> None:
        self.data["candidates"] = {c.key: asdict(c) for c in candidates}
        self.data.update(extra)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(temporary, self.path)


def plan_search(spec: Spec) -> dict[str, Any]:
    """`graphprune search --dry-run`: the candidates of the budget on meta (no weights, no data; any size).

    Without depth scores, a candidate that drops layers is counted as dropping the last ones."""
    if spec.search is None:
        raise SearchError("the spec has no 'search' section")
    budget, measure = _budget(spec)
    analysis = analyze(spec.model.path, meta=True, trust_remote_code=spec.model.trust_remote_code)
    if analysis.family is None:
        raise SearchError("search: needs a Hugging Face model (the generic graph output cannot be trained or measured)")
    last_dropped_first = torch.arange(len(analysis.layers), 0, -1, dtype=torch.float)
    candidates, enumerated, within_budget = enumerate_candidates(analysis, spec, last_dropped_first)
    return {"dry_run": True, "budget": {"measure": measure, "value": budget}, "enumerated": enumerated,
            "within_budget": within_budget, "original_params": analysis.params,
            "candidates": [asdict(c) for c in candidates]}


def run_search(spec: Spec, console: Any) -> dict[str, Any]:
    """`graphprune search SPEC`: the whole search; returns the report (also in <output>/search.json)."""
    from .apply import check_device, protected_paths
    from .outputs import OutputLock, check_output_location

    if spec.search is None:
        raise SearchError("the spec has no 'search' section")
    if spec.distill is None:
        raise SearchError("distill: the top K get a short distillation; add a 'distill' section (its steps or "
                          "tokens are the short budget)")
    if spec.output is None:
        raise SearchError("output: the search needs a folder for search.json, the candidates and the plot")
    budget, measure = _budget(spec)
    check_device(spec)
    load_passes(spec.plugins, spec.source_dir)
    started = time.perf_counter()
    out = Path(spec.output).resolve()
    check_output_location(out, **protected_paths(spec))
    with OutputLock(out):  # resumable, so not atomic; but one search per folder, never in the user's inputs
        return _search_in(out, spec, budget, measure, started, console)


def _search_in(out: Path, spec: Spec, budget: int, measure: str, started: float, console: Any) -> dict[str, Any]:
    """The search proper, in its locked output folder (resumed from what it holds)."""
    from .apply import _to_runtime, check_removal_scores, preflight
    from .data import load_tokenizer
    from .distill import remove_scratch, training_samples

    analysis = analyze(spec.model.path, trust_remote_code=spec.model.trust_remote_code)
    if analysis.family is None:
        raise SearchError("search: needs a Hugging Face model (the generic graph output cannot be trained or measured)")
    _to_runtime(analysis, spec)
    out.mkdir(parents=True, exist_ok=True)
    remove_scratch(out)
    state = SearchState(out, fingerprint(spec), console)
    base = PassContext(spec=spec, analysis=analysis, workdir=out, console=console)
    preflight(base)

    clock = time.perf_counter()
    check_removal_scores(spec, analysis, {g.name: 0 for g in analysis.groups})  # a candidate may shrink any
    PASSES["calibrate"].fn(base, every_group=True)  # cached in <output>/scores: a resume does not recompute
    layer_choices = axis_values(analysis, "num_layers", spec.search.space.get("num_layers"))
    if min(layer_choices) < len(analysis.layers):
        if state.data.get("depth_scores") is None:
            depth_ctx = PassContext(spec=spec.model_copy(update={"targets": TargetsSpec(num_layers=min(layer_choices))}),
                                    analysis=analysis, batches=base.batches, console=console)
            PASSES["score_depth"].fn(depth_ctx)
            state.data["depth_scores"] = depth_ctx.depth_scores.tolist()
        base.depth_scores = torch.tensor(state.data["depth_scores"])
    importance_seconds = time.perf_counter() - clock
    candidates, enumerated, within_budget = enumerate_candidates(analysis, spec, base.depth_scores)
    candidates = [state.restore(c) for c in candidates]
    state.save(candidates, budget={"measure": measure, "value": budget}, enumerated=enumerated,
               within_budget=within_budget)

    tokenizer = load_tokenizer(spec.distill.tokenizer or spec.model.path)
    train, holdout = training_samples(spec.distill, spec.calibration.data if spec.calibration else None, tokenizer)
    eval_set = holdout[: spec.search.eval_sequences]
    batch = spec.distill.micro_batch_size

    pending = [c for c in candidates if c.zero_shot_loss is None]
    with base.progress("zero-shot loss", len(pending)) as bar:
        for candidate in pending:
            clock = time.perf_counter()
            candidate.zero_shot_loss = heldout_loss(_materialize(base, candidate), eval_set, batch)
            candidate.seconds["zero_shot"] = round(time.perf_counter() - clock, 3)
            state.save(candidates)
            bar.advance(bar.task_ids[0])

    top = sorted(candidates, key=lambda c: c.zero_shot_loss)[: spec.search.top_k]
    for rank, candidate in enumerate(top, 1):
        if candidate.kd_loss is None:
            console.print(f"short distillation {rank}/{len(top)}: {candidate.key}")
            _short_distill(base, candidate, train, holdout, eval_set, out / "candidates" / candidate.key)
            state.save(candidates)
    _bench(spec, out, [c for c in top if c.tokens_per_s is None], console)
    state.save(candidates)

    best = choose(top, spec.search.loss_tolerance)
    report = _report(spec, candidates, top, best, enumerated, within_budget, budget, measure)
    report["seconds"] = _seconds(candidates, importance_seconds, time.perf_counter() - started)
    if spec.search.final_distill_steps:
        report["winner"] = _final_distill(base, best, train, holdout, eval_set, out)
    state.save(candidates, **report)
    (out / "search.md").write_text(markdown(state.data) + "\n")
    pareto_plot(state.data, out / "pareto.png")
    return state.data


def _short_distill(base: PassContext, candidate: Candidate, train, holdout, eval_set, folder: Path) -> None:
    from .export.hf import write_hf_checkpoint

    student = _materialize(base, candidate)
    clock = time.perf_counter()
    result = distill_in_process(base.analysis.model, student, train, holdout, base.spec.distill, base.console,
                                scratch_in=base.workdir)
    candidate.seconds["distill"] = round(time.perf_counter() - clock, 3)
    clock = time.perf_counter()
    candidate.kd_kl = result.eval_loss
    candidate.kd_loss = heldout_loss(student, eval_set, base.spec.distill.micro_batch_size)
    candidate.seconds["kd_eval"] = round(time.perf_counter() - clock, 3)
    write_hf_checkpoint(student, folder, tokenizer_from=base.spec.model.path)  # what bench runs


def _bench(spec: Spec, out: Path, candidates: list[Candidate], console: Any) -> None:
    """Generation speed of the candidates (and of the original, the reference), in one bench run."""
    from .bench import BenchSettings, bench, end_to_end_seconds

    if not candidates:
        return
    settings = spec.search.bench
    bench_settings = BenchSettings.from_spec(settings, settings.engines[0], spec.model.device, spec.plugins)
    clock = time.perf_counter()
    with console.status("benchmarking the top candidates...") as status:
        report = bench([spec.model.path] + [str(out / "candidates" / c.key) for c in candidates], bench_settings,
                       progress=lambda what: status.update(f"benchmarking {what}..."))
    seconds = (time.perf_counter() - clock) / (len(candidates) + 1)
    generated = settings.batch * settings.output_len
    for candidate, result in zip(candidates, report["results"][1:]):
        candidate.tokens_per_s = round(generated / end_to_end_seconds(result), 2)
        candidate.relative_throughput = round(result["speedup_vs_first"], 4)  # against the original
        candidate.seconds["bench"] = round(seconds, 3)


def _final_distill(base: PassContext, best: Candidate, train, holdout, eval_set, out: Path) -> dict[str, Any]:
    """The winner, from its short-KD weights, distilled `final_distill_steps` more into <output>/winner."""
    from transformers import AutoModelForCausalLM

    from .export.hf import write_hf_checkpoint

    spec = base.spec.distill.model_copy(update={"steps": base.spec.search.final_distill_steps, "tokens": None})
    student = AutoModelForCausalLM.from_pretrained(out / "candidates" / best.key, dtype=torch.float32)
    student.to(next(base.analysis.model.parameters()).device)
    result = distill_in_process(base.analysis.model, student, train, holdout, spec, base.console, scratch_in=out)
    write_hf_checkpoint(student, out / "winner", tokenizer_from=base.spec.model.path)
    return {"folder": str(out / "winner"), "steps": result.steps, "tokens": result.tokens,
            "loss": heldout_loss(student, eval_set, spec.micro_batch_size), "kd_kl": result.eval_loss}


def _report(spec: Spec, candidates: list[Candidate], top: list[Candidate], best: Candidate, enumerated: int,
            within_budget: int, budget: int, measure: str) -> dict[str, Any]:
    return {
        "budget": {"measure": measure, "value": budget, "min_fraction": spec.search.min_budget_fraction},
        "enumerated": enumerated,
        "within_budget": within_budget,
        "top_k": [c.key for c in top],
        "rank_correlation": spearman([c.zero_shot_loss for c in top], [c.kd_loss for c in top]),
        "best": {"key": best.key, "config": best.config, "params": best.params, "targets": best.targets,
                 "kd_loss": best.kd_loss, "tokens_per_s": best.tokens_per_s, "folder": f"candidates/{best.key}"},
    }


def _seconds(candidates: list[Candidate], importance: float, wall: float) -> dict[str, float]:
    """Wall time against the forward/backward work it contains (evaluations, distillations, benchmarks)."""
    work = {phase: round(sum(c.seconds.get(phase, 0.0) for c in candidates), 3)
            for phase in ("zero_shot", "distill", "kd_eval", "bench")}
    return {"importance": round(importance, 3), **work, "work": round(sum(work.values()), 3),
            "wall_this_run": round(wall, 3)}


def markdown(report: dict[str, Any]) -> str:
    candidates = sorted(report["candidates"].values(), key=lambda c: c["zero_shot_loss"])
    keys = sorted(k for k in {k for c in candidates for k in c["config"]}
                  if len({c["config"].get(k) for c in candidates}) > 1)  # the axes that vary
    lines = ["| " + " | ".join(keys) + " | params | zero-shot loss | loss after short KD | tokens/s | rel. throughput |",
             "|" + "---:|" * (len(keys) + 5)]
    for c in candidates:
        best = " **(best)**" if c["targets"] == report["best"]["targets"] else ""
        fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
        lines.append("| " + " | ".join(str(c["config"].get(k, "")) for k in keys) +
                     f" | {c['params']:,}{best} | {c['zero_shot_loss']:.4f} | {fmt(c['kd_loss'], '.4f')} "
                     f"| {fmt(c['tokens_per_s'], ',.1f')} | {fmt(c['relative_throughput'], '.2f')} |")
    correlation = report.get("rank_correlation")
    lines.append("")
    lines.append(f"{report['enumerated']} shapes enumerated, {report['within_budget']} within the budget, "
                 f"{len(candidates)} evaluated; zero-shot vs "
                 f"post-KD rank correlation over the top {len(report['top_k'])}: "
                 f"{'n/a' if correlation is None else f'{correlation:.2f}'}")
    return "\n".join(lines)


def pareto_plot(report: dict[str, Any], path: Path) -> None:
    """Loss against parameters: zero-shot (hollow) for all, after short KD (filled, coloured by tokens/s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = list(report["candidates"].values())
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.scatter([c["params"] for c in candidates], [c["zero_shot_loss"] for c in candidates], facecolors="none",
                 edgecolors="#888888", label="zero-shot")
    measured = [c for c in candidates if c["kd_loss"] is not None]
    if measured:
        speeds = [c["tokens_per_s"] or 0.0 for c in measured]
        points = axis.scatter([c["params"] for c in measured], [c["kd_loss"] for c in measured], c=speeds,
                              cmap="viridis", label="after short KD", zorder=3)
        figure.colorbar(points, ax=axis, label="tokens/s")
        best = report["best"]
        axis.scatter([best["params"]], [best["kd_loss"]], marker="*", s=250, c="red", label="chosen", zorder=4)
    axis.set_xlabel("parameters")
    axis.set_ylabel("held-out loss")
    axis.set_title(f"search: {len(candidates)} candidates within the {report['budget']['measure']} budget")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
