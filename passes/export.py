"""export: write the deployment formats of the `export` section into <output>/export/<format>."""

from __future__ import annotations

from graphprune.export import export_model
from graphprune.pipeline import PassContext, PassResult, PipelineError, register_pass


@register_pass("export", requires=("pruned_model",), sections=("export",))
def export(ctx: PassContext) -> PassResult:
    """Every format in `export.formats`, from the final (pruned, distilled) model."""
    spec = ctx.section("export")
    if ctx.analysis.family is None:
        raise PipelineError("export: needs a Hugging Face family model (the generic output is model.pt2)")
    if ctx.workdir is None:
        return PassResult(summary={"formats": spec.formats, "written": False})
    written = {}
    for fmt in spec.formats:
        with ctx.console.status(f"exporting {fmt}..."):
            export_model(ctx.pruned_model, fmt, ctx.workdir / "export" / fmt, tokenizer_from=ctx.workdir,
                         **spec.options.get(fmt, {}))
        written[fmt] = f"export/{fmt}"
    ctx.report["export"] = written
    return PassResult(changed=False, summary={"formats": written})
