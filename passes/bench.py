"""bench: prefill/decode speed and peak memory of the original against the pruned model (`bench` section)."""

from __future__ import annotations

from graphprune.bench import BenchSettings, bench as run_bench
from graphprune.pipeline import PassContext, PassResult, PipelineError, register_pass


@register_pass("bench", requires=("pruned_model",), sections=("bench",))
def bench(ctx: PassContext) -> PassResult:
    """Each engine of `bench.engines` on the original model folder and on the written output."""
    spec = ctx.section("bench")
    if ctx.workdir is None or ctx.analysis.family is None:
        raise PipelineError("bench: needs a written Hugging Face family model (not a dry run, not model.pt2)")
    results = {}
    exported_onnx = ctx.workdir / "export" / "onnx"
    for engine in spec.engines:
        # the onnxruntime engine exports a model folder first, unless the export pass already did
        pruned = exported_onnx if engine == "onnxruntime" and exported_onnx.is_dir() else ctx.workdir
        settings = BenchSettings.from_spec(spec, engine, ctx.spec.model.device)
        with ctx.console.status(f"benchmarking ({engine})...") as status:
            results[engine] = run_bench([ctx.spec.model.path, str(pruned)], settings,
                                        progress=lambda what: status.update(f"benchmarking {what}..."),
                                        labels=["original", "pruned"])
    ctx.report["bench"] = results
    speedups = {engine: round(r["results"][1]["speedup_vs_first"], 3) for engine, r in results.items()}
    return PassResult(summary={"speedup_vs_original": speedups})
