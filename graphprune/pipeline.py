"""The pass manager: a spec's pipeline of named passes over one shared context.

A pass is a function `pass_fn(ctx, **args) -> PassResult`, registered by name with
`@register_pass("name")`. Built-in passes live in `passes/` (`graphprune.passes`); plugins
register theirs when imported (spec `plugins`) or through the entry-point group
`graphprune.passes`. The manager checks each pass's declared inputs before running it and times
every pass for the report.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, get_type_hints

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from .api import Analysis
from .errors import UserError
from .planning import Plan
from .spec import Spec, TargetsSpec, shortened

DEFAULT_PIPELINE = ["calibrate", "score_depth", "plan", "prune", "drop_layers", "materialize", "verify"]
DRY_RUN_PIPELINE = ["plan"]


class PipelineError(UserError):
    """A pass cannot run (a missing input, an unknown pass name, a failing check)."""


@dataclass
class PassResult:
    changed: bool = False
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes read and write. Passes communicate only through this object."""

    spec: Spec
    analysis: Analysis
    workdir: Path | None = None            # the output being built (None for --dry-run)
    dry_run: bool = False
    batches: list[torch.Tensor] | None = None
    activations: dict[str, torch.Tensor] = field(default_factory=dict)   # per-channel scores per site
    unit_scores: dict[str, torch.Tensor] = field(default_factory=dict)   # taylor/removal scores per group
    depth_scores: torch.Tensor | None = None
    targets: TargetsSpec | None = None    # what plan follows when a pass chose it (choose_split); else the spec's
    plan: Plan | None = None
    state_dict: dict[str, torch.Tensor] | None = None  # the pruned weights, by original name
    pruned_model: torch.nn.Module | None = None
    report: dict[str, Any] = field(default_factory=dict)
    console: Console = field(default_factory=lambda: Console(stderr=True))

    def section(self, name: str) -> Any:
        """The spec section a pass is configured by (`distill`, `export`, `bench`); an error when it is absent."""
        value = getattr(self.spec, name)
        if value is None:
            raise PipelineError(f"{name}: the spec has no '{name}' section")
        return value

    def progress(self, description: str, total: int) -> Progress:
        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                       console=self.console, transient=True)
        bar.add_task(description, total=total)
        return bar


PassFn = Callable[..., PassResult]


@dataclass(frozen=True)
class RegisteredPass:
    name: str
    fn: PassFn
    requires: tuple[str, ...]
    provides: tuple[str, ...]
    sections: tuple[str, ...]
    doc: str

    def arguments(self) -> type[BaseModel]:
        """The pass's keyword arguments as a pydantic model, from its signature and annotations."""
        return _arguments_model(self.fn, self.name)


@functools.lru_cache(maxsize=None)
def _arguments_model(fn: Callable, name: str) -> type[BaseModel]:
    signature = inspect.signature(fn)
    try:
        hints = get_type_hints(fn)
    except Exception:  # noqa: BLE001 - a plugin's unresolvable annotation: check names, not types
        hints = {}
    parameters = list(signature.parameters.values())[1:]  # the first is the context
    fields = {p.name: (hints.get(p.name, Any), ... if p.default is p.empty else p.default)
              for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters)
    config = ConfigDict(extra="allow" if open_ended else "forbid", arbitrary_types_allowed=True)
    return create_model(f"{name}_args", __config__=config, **fields)


PASSES: dict[str, RegisteredPass] = {}


def register_pass(name: str, requires: tuple[str, ...] = (), provides: tuple[str, ...] = (),
                  sections: tuple[str, ...] = ()) -> Callable[[PassFn], PassFn]:
    """Register `fn(ctx, **args) -> PassResult` as pass `name`.

    `requires` / `provides` name PassContext fields (e.g. "plan", "state_dict"): the manager refuses
    to run a pass whose inputs no earlier pass produced. `sections` names the spec sections the pass
    is configured by (e.g. "distill"). A spec's pass arguments are checked against `fn`'s signature
    and annotations before anything loads.
    """

    def decorate(fn: PassFn) -> PassFn:
        PASSES[name] = RegisteredPass(name, fn, requires, provides, sections, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return decorate


def load_passes(plugins: list[str], spec_dir: Path | None = None) -> None:
    """Built-ins, then plugin modules from the spec (a module beside the spec file imports too), then
    installed entry points. Plugins are ordinary Python modules: importing one runs its code."""
    importlib.import_module("graphprune.passes")
    for module in plugins:
        if not module or not all(part.isidentifier() for part in module.split(".")):
            raise PipelineError(f"plugins: {module[:100]!r} is not a Python module name (e.g. 'my_passes', 'pkg.passes')")
        added = spec_dir is not None and str(spec_dir) not in sys.path
        if added:
            sys.path.insert(0, str(spec_dir))
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise PipelineError(f"plugins: cannot import {module!r}: {err}") from err
        finally:
            if added:
                sys.path.remove(str(spec_dir))
    for entry in entry_points(group="graphprune.passes"):
        entry.load()
    from graphprune.bench import ENGINES
    from graphprune.export import FORMATS

    FORMATS.load()  # built-in and installed formats and engines; the plugins above registered theirs
    ENGINES.load()


Pipeline = list[tuple[str, dict[str, Any]]]


def check_pipeline(spec: Spec, pipeline: Pipeline) -> Pipeline:
    """Everything about a pipeline that needs no weights: pass names, data flow, the spec sections each
    pass needs, and each pass's arguments (names and types). Returns the pipeline with validated arguments."""
    unknown = [name for name, _ in pipeline if name not in PASSES]
    if unknown:
        raise PipelineError(f"passes: unknown pass {', '.join(repr(n[:100]) for n in unknown)}; registered passes: "
                            f"{', '.join(sorted(PASSES))}")
    available, checked = {"spec", "analysis"}, []
    for index, (name, args) in enumerate(pipeline):
        registered = PASSES[name]
        missing = [r for r in registered.requires if r not in available]
        if missing:
            raise PipelineError(f"pass {name!r} needs {', '.join(missing)}, which no earlier pass provides")
        available.update(registered.provides)
        absent = [section for section in registered.sections if getattr(spec, section, None) is None]
        if absent:
            raise PipelineError(f"pass {name!r} needs the spec's {', '.join(map(repr, absent))} section")
        checked.append((name, _checked_arguments(registered, args, f"passes[{index}].args")))
    check_backends(spec)
    return checked


def check_backends(spec: Spec) -> None:
    """The export formats and bench engines a spec names are registered, and take the options it gives."""
    from graphprune.bench import ENGINES
    from graphprune.export import FORMATS

    sections = [("export", "formats", FORMATS, spec.export), ("bench", "engines", ENGINES, spec.bench),
                ("search.bench", "engines", ENGINES, spec.search.bench if spec.search else None)]
    for where, field_name, registry, section in sections:
        if section is None:
            continue
        names = getattr(section, field_name)
        for index, name in enumerate(names):
            registry.get(name, f"{where}.{field_name}[{index}]").checked_options(
                section.options.get(name), f"{where}.options.{name}")
        for name in section.options:
            if name not in names:
                raise PipelineError(f"{where}.options.{name}: {name!r} is not in {where}.{field_name} "
                                    f"({', '.join(names)})")


def _checked_arguments(registered: RegisteredPass, args: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        validated = registered.arguments().model_validate(args)
    except ValidationError as err:
        accepted = ", ".join(registered.arguments().model_fields) or "none"
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(all)'}: "
                             f"{'unknown argument' if e['type'] == 'extra_forbidden' else e['msg']}"
                             for e in err.errors())
        raise PipelineError(f"{where} of pass {registered.name!r}: {shortened(problems, 300)} "
                            f"(arguments it takes: {accepted})") from None
    given = {key: getattr(validated, key) for key in validated.model_fields_set if key in type(validated).model_fields}
    return {**given, **(validated.model_extra or {})}


def run_pipeline(ctx: PassContext, pipeline: Pipeline) -> None:
    pipeline = check_pipeline(ctx.spec, pipeline)
    timings = ctx.report.setdefault("seconds_per_pass", {})
    for name, args in pipeline:
        start = time.perf_counter()
        ctx.console.print(f"[bold]{name}[/bold]", highlight=False)
        result = PASSES[name].fn(ctx, **args)
        timings[name] = round(time.perf_counter() - start, 3)
        ctx.report.setdefault("passes", []).append({"name": name, "changed": result.changed, **result.summary})


def pipeline_of(spec: Spec, dry_run: bool) -> Pipeline:
    if dry_run:  # planning only: keep what runs without weights or data
        steps = [(p.name, p.args) for p in spec.passes] if spec.passes is not None else [(n, {}) for n in DRY_RUN_PIPELINE]
        return [(name, args) for name, args in steps if name in DRY_RUN_PIPELINE]
    if spec.passes is not None:
        steps = [(p.name, p.args) for p in spec.passes]
    else:
        names = list(DEFAULT_PIPELINE)
        if spec.targets.params is not None and spec.importance.split_candidates > 1 and spec.calibration is not None:
            names.insert(names.index("plan"), "choose_split")  # a budget: compare ways to spend it first
        if spec.reconstruct is not None and spec.calibration is not None:  # refit before dropping and writing
            names.insert(names.index("prune") + 1, "reconstruct")
        if spec.distill is not None:  # recover the pruned model before it is verified
            names.insert(names.index("verify"), "distill")
        steps = [(name, {}) for name in names]
    # an `export` or `bench` section runs its pass last, unless the explicit pipeline places it
    listed = {name for name, _ in steps}
    return steps + [(name, {}) for name in ("export", "bench") if getattr(spec, name) is not None and name not in listed]


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
