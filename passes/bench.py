"""bench: prefill/decode speed and peak memory of the original against the pruned model (`bench` section)."""

from __future__ import annotations

from graphprune.bench import ENGINES, BenchSettings, bench as run_bench
from graphprune.pipeline import PassContext, PassResult, PipelineError, register_pass


@register_pass("bench", requires=("pruned_model",), sections=("bench",))
def bench(ctx: PassContext) -> PassResult:
    """Each engine of `bench.engines` on the original model folder and on the written output."""
    spec = ctx.section("bench")
    if ctx.workdir is None or ctx.analysis.family is None:
        raise PipelineError("bench: needs a written Hugging Face family model (not a dry run, not model.pt2)")
    results = {}
    for engine in spec.engines:
        # an engine that reads an export format uses the export pass's folder when it wrote one
        readable = ENGINES.get(engine, "bench.engines").hooks.get("reads_export")
        exported = ctx.workdir / "export" / readable if readable else None
        pruned = exported if exported is not None and exported.is_dir() else ctx.workdir
        settings = BenchSettings.from_spec(spec, engine, ctx.spec.model.device, ctx.spec.plugins)
        with ctx.console.status(f"benchmarking ({engine})...") as status:
            results[engine] = run_bench([ctx.spec.model.path, str(pruned)], settings,
                                        progress=lambda what: status.update(f"benchmarking {what}..."),
                                        labels=["original", "pruned"])
    ctx.report["bench"] = results
    speedups = {engine: round(r["results"][1]["speedup_vs_first"], 3) for engine, r in results.items()}
    return PassResult(summary={"speedup_vs_original": speedups})
