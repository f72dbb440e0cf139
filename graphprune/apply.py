"""`graphprune apply`: validate everything, then run the pipeline into an atomic output folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .api import Analysis, analyze
from .data import check_data, check_vocabulary, load_tokenizer
from .importance import SPEC_FIELD_OF_KIND, input_embeddings, method_for
from .outputs import AtomicOutput
from .pipeline import PassContext, PipelineError, check_pipeline, load_passes, pipeline_of, run_pipeline, write_json
from .planning import PlanError, count_params, plan_sizes, pruned_config
from .spec import Spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply(spec: Spec, *, model: torch.nn.Module | None = None, dry_run: bool = False, force: bool = False,
          console=None) -> dict[str, Any]:
    """Prune per the spec; returns the report (also written to <output>/report.json).

    `model` prunes an in-memory module instead of `spec.model.path` (any nn.Module: without a family
    adapter the output is a rewritten torch.export graph, model.pt2).
    """
    load_passes(spec.plugins, spec.source_dir)
    check_pipeline(spec, pipeline_of(spec, dry_run=False))  # a dry run checks the full run's pipeline too
    check_device(spec)
    meta = dry_run or spec.model.device == "meta"
    if meta:
        ctx = _prepared_context(spec, model, meta=True, console=console)
        started = time.perf_counter()
        run_pipeline(ctx, pipeline_of(spec, dry_run=True))
        return _report(ctx, started)
    if spec.output is None:
        raise PipelineError("output: a full run needs an output directory (or use --dry-run to plan only)")
    # the output's lock is held from before loading to the end: a second run to it fails at once
    with AtomicOutput(spec.output, force, **protected_paths(spec)) as workdir:
        ctx = _prepared_context(spec, model, meta=False, console=console)
        ctx.workdir = workdir
        started = time.perf_counter()
        run_pipeline(ctx, pipeline_of(spec, dry_run=False))
        report = _report(ctx, started)
        report["written"] = sorted([p.name for p in workdir.iterdir()] + ["report.json"])  # what is there, not hoped
        write_json(workdir / "report.json", report)
    return report


def _prepared_context(spec: Spec, model: torch.nn.Module | None, meta: bool, console) -> PassContext:
    analysis = analyze(model if model is not None else spec.model.path, meta=meta,
                       trust_remote_code=spec.model.trust_remote_code)
    if not meta and next(analysis.model.parameters()).device.type == "meta":
        raise PipelineError(f"model.path: {spec.model.path} has a config but no weights (model.safetensors); a full "
                            "run needs them (--dry-run plans on the config alone)")
    _to_runtime(analysis, spec)
    ctx = PassContext(spec=spec, analysis=analysis, dry_run=meta)
    if console is not None:
        ctx.console = console
    preflight(ctx)
    return ctx


def protected_paths(spec: Spec) -> dict[str, dict[str, Path]]:
    """The user's files an output must not overwrite: model and teacher folders (never written into),
    the spec's folder and the data files' folders (never replaced). Hub ids have no local folder."""

    def folder(value: str | None) -> Path | None:
        if value is None or not Path(value).exists():
            return None
        return Path(value) if Path(value).is_dir() else Path(value).parent

    inputs = {"the model folder": folder(spec.model.path),
              "the teacher's folder": folder(spec.distill.teacher if spec.distill else None),
              "the tokenizer folder": folder(spec.calibration.tokenizer if spec.calibration else None)}
    sources = {"the spec's folder": spec.source_dir,
               "the calibration data's folder": folder(spec.calibration.data.path if spec.calibration else None),
               "the distillation data's folder": folder(spec.distill.data.path if spec.distill and spec.distill.data
                                                        else None)}
    return {"inputs": {k: v for k, v in inputs.items() if v is not None},
            "sources": {k: v for k, v in sources.items() if v is not None}}


def check_device(spec: Spec) -> None:
    if spec.model.device == "cuda" and not torch.cuda.is_available():
        raise PipelineError("model.device: 'cuda', but torch sees no CUDA device on this machine; use 'cpu' (or "
                            "'meta' to plan only)")


def _to_runtime(analysis: Analysis, spec: Spec) -> None:
    model = analysis.model
    if next(model.parameters()).device.type == "meta":
        return
    model.to(device=spec.model.device, dtype=DTYPES[spec.model.dtype])


def preflight(ctx: PassContext) -> None:
    """Every check that needs no forward pass, before anything runs: targets, family, data, tokenizer."""
    spec, analysis = ctx.spec, ctx.analysis
    plan = plan_sizes(analysis, spec.targets)
    _check_something_is_pruned(spec, analysis, plan.sizes)
    check_removal_scores(spec, analysis, plan.sizes)
    if analysis.family is None and spec.targets.num_layers is not None:
        raise PlanError("targets.num_layers: depth pruning needs a Hugging Face model (its config lists the layers); "
                        "the generic graph path prunes widths only")
    if analysis.family is not None:
        pruned_config(analysis, plan.sizes)  # the family's own config class must accept the plan
    if ctx.dry_run:
        return
    if _needs_calibration(spec) and spec.calibration is None:
        raise PipelineError("calibration: activation, taylor, removal and KL/cosine scores need calibration data; "
                            "add a 'calibration' section or set importance methods to 'magnitude'/'random'")
    if spec.calibration is not None:
        check_data(spec.calibration.data, "calibration.data")
        tokenizer = load_tokenizer(spec.calibration.tokenizer or spec.model.path, spec.model.trust_remote_code)
        check_vocabulary(tokenizer, input_embeddings(analysis.model).num_embeddings, "calibration.tokenizer")
    if spec.distill is not None and spec.distill.data is not None:
        check_data(spec.distill.data, "distill.data")


def _check_something_is_pruned(spec: Spec, analysis: Analysis, sizes: dict[str, int]) -> None:
    """An unpruned copy is written only when asked for: a forgotten or too-large target is an error."""
    unchanged = all(sizes.get(g.name, g.size) == g.size for g in analysis.groups) and \
        sizes.get("layers", len(analysis.layers)) == len(analysis.layers)
    if not unchanged or spec.targets.identity:
        return
    if spec.targets.params is not None:
        raise PlanError(f"targets.params: the budget {spec.targets.params:,} is not below the model's "
                        f"{analysis.params:,} parameters: nothing would be pruned")
    raise PlanError("targets: no target shrinks the model (none given, or each equals the model's size), so the output "
                    "would be an unpruned copy; give a smaller size, or set targets.identity: true to write one on purpose")


REMOVAL_KINDS = ("attention_heads", "mamba_heads")


def check_removal_scores(spec: Spec, analysis: Analysis, sizes: dict[str, int]) -> None:
    """`removal` costs one forward per unit: heads only (FFN neurons, channels: use taylor), for the groups
    these sizes shrink."""
    for group in analysis.groups:
        method = method_for(spec.importance, group)
        if method == "removal" and sizes[group.name] < group.size and group.kind not in REMOVAL_KINDS:
            field = SPEC_FIELD_OF_KIND[group.kind]
            raise PlanError(f"importance.{field}: 'removal' scores heads (one forward per unit); {group.name} has "
                            f"{group.size} {group.kind} units: use 'taylor' for it")


def _needs_calibration(spec: Spec) -> bool:
    importance = spec.importance
    data_driven = {importance.hidden, importance.ffn, importance.mamba, importance.attention} & {
        "activation", "taylor", "removal"}
    depth = spec.targets.num_layers is not None and importance.depth != "random"
    listed = {p.name for p in spec.passes or []}
    return bool(data_driven) or depth or "reconstruct" in listed


def config_summary(analysis: Analysis, config: Any | None, sizes: dict[str, int]) -> dict[str, Any]:
    """The family's config keys, or (generic models) the size of every group."""
    if analysis.family is None or config is None:
        return {name: size for name, size in sizes.items()}
    keys = analysis.family.summary_keys(analysis.structure)
    return {k: getattr(config, k) for k in keys if hasattr(config, k)}


EXPLICIT_REPORT_KEYS = {"groups", "dropped_layers", "passes", "seconds_per_pass"}


def _report(ctx: PassContext, started: float) -> dict[str, Any]:
    analysis, plan = ctx.analysis, ctx.plan
    original_sizes = {g.name: g.size for g in analysis.groups}
    config = pruned_config(analysis, plan.sizes, plan.dropped_layers) if analysis.family is not None and plan else None
    dropped = plan.dropped_layers if plan else []
    note = None
    if ctx.dry_run and plan is not None and plan.sizes.get("layers", len(analysis.layers)) < len(analysis.layers):
        dropped = list(range(plan.sizes["layers"], len(analysis.layers)))
        note = ("dry run: which layers to drop is decided by score_depth on data; parameters are counted "
                "as if the last layers were dropped")
    return {
        "spec": ctx.spec.model_dump(),
        "dry_run": ctx.dry_run,
        "original": {"params": analysis.params,
                     "config": config_summary(analysis, getattr(analysis.model, "config", None), original_sizes)},
        "pruned": {"params": count_params(analysis, plan.sizes, dropped) if plan else analysis.params,
                   "config": config_summary(analysis, config, plan.sizes if plan else original_sizes)},
        "groups": ctx.report.get("groups", {}),
        **{key: value for key, value in ctx.report.items() if key not in EXPLICIT_REPORT_KEYS},  # every pass's entry
        "dropped_layers": dropped,
        "passes": ctx.report.get("passes", []),
        "seconds_per_pass": {"analyze": round(sum(analysis.timings.values()), 3), **ctx.report.get("seconds_per_pass", {})},
        "seconds_total": round(time.perf_counter() - started + sum(analysis.timings.values()), 3),
        "output": ctx.spec.output if not ctx.dry_run else None,
        **({"note": note} if note else {}),
    }

