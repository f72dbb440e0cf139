"""The `graphprune` command line."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .api import Analysis, analyze
from .data import DataError
from .errors import UserError
from .spec import json_schema, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Structured pruning of hybrid LMs as graph rewrites.")
stderr = Console(stderr=True)
USER_ERRORS = (UserError,)  # subclasses of UserError are the user's to fix; anything else is a bug


def _console() -> Console:
    """Standard output; wide enough for the tables when it is not a terminal."""
    return Console() if Console().is_terminal else Console(width=160)


def _fail(err: Exception) -> typer.Exit:
    """Print a user error (no traceback) and exit 2."""
    stderr.print(f"[red]error:[/red] {escape(str(err))}", highlight=False)
    return typer.Exit(2)


@app.callback()
def main() -> None:
    """graphprune: Minitron-SSM style structured pruning, driven by the traced graph."""


@app.command()
def inspect(
    model: Annotated[str, typer.Argument(help="HF model folder, config.json, or hub id (online only).")],
    meta: Annotated[bool, typer.Option("--meta", help="Build on the meta device: no weights, any size.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    seq_len: Annotated[int | None, typer.Option(help="Tokens in the example input (default: the Mamba chunk size).")] = None,
    slices: Annotated[bool, typer.Option("--slices", help="With --json, list each group's parameter slices.")] = False,
    every_layer: Annotated[bool, typer.Option("--every-layer", help="One table row per group (default: identical layers merged).")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow custom model code from the model folder.")] = False,
) -> None:
    """Trace MODEL and show its prunable groups and their constraints."""
    try:
        with stderr.status("starting") as status:
            analysis = analyze(model, meta=meta, seq_len=seq_len, trust_remote_code=trust_remote_code,
                               progress=lambda step: status.update(f"{step}..."))
    except USER_ERRORS as err:
        raise _fail(err) from None
    if as_json:
        sys.stdout.write(json.dumps(analysis.to_dict(with_slices=slices)) + "\n")
        return
    _print_analysis(analysis, every_layer)


@app.command()
def apply(
    spec_path: Annotated[str, typer.Argument(metavar="SPEC", help="The pruning spec (JSON).")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and plan only, on meta: no weights, no data.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (the report) on stdout.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")] = False,
) -> None:
    """Prune a model as SPEC says: calibrate, score, plan, slice, write, verify."""
    from .apply import apply as run_apply

    try:
        spec = load_spec(spec_path)
        report = run_apply(spec, dry_run=dry_run, force=force, console=stderr)
    except USER_ERRORS as err:
        raise _fail(err) from None
    if as_json:
        sys.stdout.write(json.dumps(report, default=str) + "\n")
        return
    _print_report(report)


@app.command()
def distill(
    spec_path: Annotated[str, typer.Argument(metavar="SPEC", help="A spec with a 'distill' section.")],
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the last checkpoint.")] = False,
    until_step: Annotated[int | None, typer.Option(help="Stop after this step, with a checkpoint (planned preemption).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Distil the pruned student (spec `output`) from the teacher (spec `model`); torchrun-ready."""
    from .distill import run_distill

    try:
        summary = run_distill(load_spec(spec_path), resume=resume, until_step=until_step, console=stderr)
    except USER_ERRORS as err:
        raise _fail(err) from None
    if int(__import__("os").environ.get("RANK", "0")) != 0:
        return
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    Console().print(f"distilled {summary['steps']} steps, {summary['tokens']:,} tokens at "
                    f"{summary['tokens_per_s']:.0f} tokens/s: loss {summary['final_loss']:.4f}, "
                    f"held-out KD loss {summary['eval_loss']:.4f} -> {summary['student']}")


@app.command("eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="A Hugging Face model folder (or hub id).")],
    data: Annotated[str | None, typer.Option(help="Held-out text (.txt/.txt.gz/.jsonl); default: the demo corpus' validation split.")] = None,
    probes: Annotated[str | None, typer.Option(help="Comma-separated probes: mqar, induction, copy ('' for none); "
                                                    "default: all three for models with the demo tokenizer, else none.")] = None,
    join: Annotated[str, typer.Option(help="'documents': documents tokenized apart, EOS between; 'raw': the file as one "
                                           "string, tokenized once without special tokens.")] = "documents",
    seq_len: Annotated[int, typer.Option(help="Tokens per window and per probe sequence.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="Held-out tokens to score.")] = 32768,
    samples: Annotated[int, typer.Option(help="Sequences per probe.")] = 64,
    seed: Annotated[int, typer.Option(help="Probe seed.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Perplexity on held-out text and probe accuracies (MQAR, induction, selective copy)."""
    from .evaluate import evaluate_path

    names = None if probes is None else [p.strip() for p in probes.split(",") if p.strip()]
    try:
        with stderr.status("evaluating..."):
            result = evaluate_path(model, data=data, probes=names, seq_len=seq_len, max_tokens=max_tokens,
                                   probe_samples=samples, seed=seed, join=join)
    except (*USER_ERRORS, ValueError, OSError) as err:
        raise _fail(err) from None
    if as_json:
        sys.stdout.write(json.dumps({"perplexity": result["perplexity"], "probes": result["probes"],
                                     "tokens": result["tokens"]}) + "\n")
        return
    table = Table(title=f"{model}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row(f"perplexity ({result['tokens']:,} tokens)", f"{result['perplexity']:.2f}")
    for name, accuracy in result["probes"].items():
        table.add_row(f"{name} accuracy", f"{accuracy:.3f}")
    Console().print(table)


@app.command("lm-eval-tasks")
def lm_eval_tasks(
    folder: Annotated[str, typer.Argument(help="Where to write the task YAML and its data.")],
    data: Annotated[str | None, typer.Option(help="Held-out text (.txt/.txt.gz/.jsonl); default: the demo's validation split.")] = None,
    max_docs: Annotated[int, typer.Option(help="Documents to include.")] = 500,
) -> None:
    """Write lm-evaluation-harness task files on local held-out text (offline)."""
    from .lm_eval_tasks import write_tasks

    try:
        written = write_tasks(Path(folder), data, max_docs)
    except (DataError, ValueError, OSError) as err:
        raise _fail(err) from None
    _console().print(f"wrote {written['task']} ({written['documents']} documents) to {written['folder']}; run:\n"
                     f"lm_eval --model hf --model_args pretrained=MODEL_DIR --include_path {written['folder']} "
                     f"--tasks {written['task']}")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="A Hugging Face model folder (or hub id).")],
    fmt: Annotated[str, typer.Option("--format", help="A registered format: hf | onnx | trtllm, or a plugin's.")],
    out: Annotated[str, typer.Option("--out", help="Output folder (written atomically).")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    input_len: Annotated[int | None, typer.Option(help="trtllm: prompt tokens per benchmark request (128).")] = None,
    output_len: Annotated[int | None, typer.Option(help="trtllm: generated tokens per benchmark request (128).")] = None,
    num_requests: Annotated[int | None, typer.Option(help="trtllm: requests in the benchmark dataset (256).")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", help="KEY=VALUE: an option of the format "
                                                     "(VALUE read as JSON when it parses); repeatable.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Write MODEL for deployment: a Hugging Face checkpoint, ONNX prefill/decode graphs, or TensorRT-LLM."""
    from .export import export_path

    given = {"input_len": input_len, "output_len": output_len, "num_requests": num_requests}
    try:
        options = {k: v for k, v in given.items() if v is not None} | _key_values(option or [], "--option")
        with stderr.status(f"exporting {fmt}..."):
            summary = export_path(model, fmt, Path(out), force=force, **options)
    except (*USER_ERRORS, OSError) as err:
        raise _fail(err) from None
    if as_json:
        sys.stdout.write(json.dumps(summary) + "\n")
        return
    Console().print(f"{fmt}: wrote {summary['folder']} ({', '.join(summary['files'])})")


def _key_values(items: list[str], where: str) -> dict[str, Any]:
    """KEY=VALUE pairs; a VALUE that parses as JSON is read as JSON (numbers, booleans, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{where}: {item!r} is not KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@app.command()
def bench(
    models: Annotated[list[str], typer.Argument(help="Model folders; ratios are taken against the first.")],
    engine: Annotated[str, typer.Option(help="A registered engine: torch | onnxruntime | trtllm, or a "
                                              "plugin's.")] = "torch",
    batch: Annotated[int, typer.Option(help="Sequences per batch.")] = 1,
    input_len: Annotated[int, typer.Option(help="Prompt tokens per sequence.")] = 128,
    output_len: Annotated[int, typer.Option(help="Generated tokens per sequence (1 prefill + decode steps).")] = 32,
    repeats: Annotated[int, typer.Option(help="Timed rounds (after one warm-up); the models' runs alternate within "
                                              "each; the median and the range are reported.")] = 3,
    device: Annotated[str, typer.Option(help="torch engine: cpu or cuda.")] = "cpu",
    threads: Annotated[int | None, typer.Option(help="CPU threads per model.")] = None,
    plot_path: Annotated[str, typer.Option("--plot", help="Write a PNG plot of tokens/s here (default: no plot).")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Prefill and decode tokens/s and peak memory of MODELS, each in its own process, side by side."""
    from .bench import BenchSettings, bench as run_bench, plot

    settings = BenchSettings(engine=engine, batch=batch, input_len=input_len, output_len=output_len,
                             repeats=repeats, device=device, threads=threads)
    try:
        with stderr.status("benchmarking...") as status:
            report = run_bench(models, settings, progress=lambda what: status.update(f"benchmarking {what}..."))
    except USER_ERRORS as err:
        raise _fail(err) from None
    if plot_path:
        plot(report, Path(plot_path))
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    _console().print(bench_table(report))
    if plot_path:
        Console().print(f"plot: {plot_path}")


def bench_table(report: dict, title: str | None = None) -> Table:
    settings = report["settings"]
    table = Table(title=title or f"{settings['engine']}: batch {settings['batch']}, input {settings['input_len']}, "
                  f"output {settings['output_len']}, median of {settings['repeats']}", title_justify="left")
    for column in ("model", "params", "prefill tok/s", "decode tok/s", "peak memory", "speed-up (rounds)", "ideal"):
        table.add_column(column, justify="left" if column == "model" else "right")
    notes = []
    for r in report["results"]:
        low, high = r.get("speedup_range", (1.0, 1.0))
        marker = "*" * (len(notes) + 1) if r.get("flags") else ""
        table.add_row(r["model"], f"{r['params']:,}", f"{r['prefill_tokens_per_s']:,.0f}",
                      f"{r['decode_tokens_per_s']:,.1f}", f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB",
                      f"{r['speedup_vs_first']:.2f}x ({low:.2f}-{high:.2f}){marker}", f"{r['ideal_speedup_vs_first']:.2f}x")
        if r.get("flags"):
            notes.append(f"{marker} {r['model']}: {'; '.join(r['flags'])}")
    table.caption = "\n".join(notes) or None
    table.caption_justify = "left"
    return table


@app.command()
def search(
    spec_path: Annotated[str, typer.Argument(metavar="SPEC", help="A spec with targets.params (or search.memory_bytes), "
                                                                  "'search' and 'distill' sections.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the candidates of the budget on meta: no weights, "
                                                             "no data, any model size.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
) -> None:
    """Search pruned shapes under a budget: zero-shot loss for all, short KD for the top K, speed; pick the best.

    Resumes from <output>/search.json when run again with the same spec."""
    from .search import markdown, plan_search, run_search

    try:
        if dry_run:
            with stderr.status("planning on meta..."):
                plan = plan_search(load_spec(spec_path))
        else:
            report = run_search(load_spec(spec_path), console=stderr)
    except USER_ERRORS as err:
        raise _fail(err) from None
    if dry_run:
        _print_search_plan(plan, as_json)
        return
    if as_json:
        candidates = [{"config": c["config"], "params": c["params"], "zero_shot_loss": c["zero_shot_loss"],
                       "kd_loss": c["kd_loss"], "tokens_per_s": c["tokens_per_s"], "targets": c["targets"],
                       "memory_bytes": c["memory_bytes"], "relative_throughput": c["relative_throughput"]}
                      for c in report["candidates"].values()]
        sys.stdout.write(json.dumps({"candidates": candidates, "best": report["best"],
                                     "rank_correlation": report["rank_correlation"], "seconds": report["seconds"],
                                     "enumerated": report["enumerated"], "budget": report["budget"]}) + "\n")
        return
    _console().print(markdown(report))
    _console().print(f"best: {report['best']['key']} ({report['best']['params']:,} parameters) -> "
                     f"{Path(load_spec(spec_path).output) / report['best']['folder']}")


def _print_search_plan(plan: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(plan) + "\n")
        return
    rows = plan["candidates"]
    keys = sorted({k for c in rows for k in c["config"]})
    table = Table(title=f"dry run: {plan['within_budget']} of {plan['enumerated']} shapes fit the {plan['budget']['measure']} "
                  f"budget ({plan['budget']['value']:,}); {len(rows)} to evaluate", title_justify="left")
    for column in (*keys, "params"):
        table.add_column(column, justify="right")
    for c in rows:
        table.add_row(*(str(c["config"].get(k, "")) for k in keys), f"{c['params']:,}")
    _console().print(table)


@app.command()
def schema() -> None:
    """Print the JSON Schema of pruning specs (kept in specs/schema.json)."""
    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


def _print_report(report: dict) -> None:
    console = _console()
    table = Table(title="dry run: planned configuration" if report["dry_run"] else "pruned", title_justify="left")
    for column in ("", "original", "pruned"):
        table.add_column(column, justify="left" if not column else "right")
    before, after = report["original"], report["pruned"]
    for key in before["config"]:
        table.add_row(key, str(before["config"][key]), str(after["config"].get(key, "")))
    ratio = after["params"] / before["params"]
    table.add_row("parameters", f"{before['params']:,}", f"{after['params']:,} ({ratio:.1%})")
    console.print(table)
    evaluation = report.get("evaluation")
    if evaluation:
        scores = Table(title="evaluation (held-out perplexity, probe accuracy)", title_justify="left")
        scores.add_column("")
        for label in evaluation:
            scores.add_column(label, justify="right")
        scores.add_row("perplexity", *(f"{e['perplexity']:.2f}" for e in evaluation.values()))
        for probe in next(iter(evaluation.values()))["probes"]:
            scores.add_row(f"{probe} accuracy", *(f"{e['probes'][probe]:.3f}" for e in evaluation.values()))
        console.print(scores)
    if report.get("distill"):
        d = report["distill"]
        console.print(f"distilled: {d['steps']} steps, {d['tokens']:,} tokens, {d['tokens_per_s']:.0f} tokens/s, "
                      f"held-out KD loss {d['eval_loss']:.4f}")
    for engine, bench_report in report.get("bench", {}).items():
        console.print(bench_table(bench_report, title=f"speed ({engine}): prefill and decode tokens/s"))
    if report.get("export"):
        console.print("exported: " + ", ".join(f"{fmt} -> {path}" for fmt, path in report["export"].items()))
    if report.get("dropped_layers"):
        console.print(f"dropped layers: {report['dropped_layers']}")
    if report.get("note"):
        console.print(report["note"])
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in report["seconds_per_pass"].items())
    console.print(f"time: {timing}")
    if report.get("output"):
        console.print(f"written: {report['output']} ({', '.join(report.get('written', []))})")


def _print_analysis(analysis: Analysis, every_layer: bool) -> None:
    console = _console()
    table = Table(title=f"{type(analysis.model).__name__}: prunable groups", title_justify="left")
    for column in ("group", "kind", "layers", "size", "balanced over", "unit", "params", "fixed", "config key"):
        table.add_column(column, justify="right" if column in ("size", "unit", "params", "balanced over") else "left",
                         no_wrap=column in ("group", "kind", "params"))
    for row in _table_rows(analysis, every_layer):
        table.add_row(*row)
    console.print(table)
    kinds = Counter(layer.kind for layer in analysis.layers)
    summary = ", ".join(f"{n} {kind}" for kind, n in kinds.items())
    console.print(f"layers: {len(analysis.layers)} ({summary})" if analysis.layers else "layers: none found")
    console.print(f"parameters: {analysis.params:,}   family: {analysis.family.name if analysis.family else 'generic'}")
    timing = ", ".join(f"{k} {v:.1f}s" for k, v in analysis.timings.items())
    console.print(f"time: {timing}")


def _table_rows(analysis: Analysis, every_layer: bool) -> list[tuple[str, ...]]:
    """One row per group, or (default) one row per set of identical groups in different layers."""
    rows: dict[tuple, list[int | None]] = {}
    for g in analysis.groups:
        name = g.name if every_layer or g.layer is None else g.name.replace(f"layers.{g.layer}.", "layers.*.", 1)
        fixed = ", ".join(f"{k}={v}" for k, v in g.fixed.items())
        balanced = str(g.balanced_groups) if g.balanced_groups > 1 else ""
        key = (name, g.kind, str(g.size), balanced, str(g.unit), f"{g.params:,}", fixed, g.config_key or "")
        rows.setdefault(key, []).append(g.layer)
    out = []
    for (name, kind, *rest), layers in rows.items():
        out.append((name, kind, _layer_list(layers), *rest))
    return out


def _layer_list(layers: list[int | None]) -> str:
    if layers == [None]:
        return "all"
    shown = ",".join(str(i) for i in layers[:6])
    return f"{shown},... ({len(layers)})" if len(layers) > 6 else shown


if __name__ == "__main__":
    app()
