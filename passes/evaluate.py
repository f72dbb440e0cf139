"""evaluate: perplexity and probe accuracies of the original and the pruned model, side by side."""

from __future__ import annotations

from graphprune.data import load_tokenizer
from graphprune.evaluate import evaluate as evaluate_model
from graphprune.pipeline import PassContext, PassResult, register_pass


@register_pass("evaluate", requires=("pruned_model",))
def evaluate(ctx: PassContext, label: str = "pruned", data: str | None = None, probes: list[str] | None = None,
             seq_len: int = 256, max_tokens: int = 16384, probe_samples: int = 64, seed: int = 0) -> PassResult:
    """Held-out perplexity and probes (MQAR, induction, copy) of the original and of the model as it is
    now, under `label` (e.g. "pruned" before distill and "distilled" after); goes into the report."""
    spec = ctx.spec
    tokenizer = load_tokenizer(spec.calibration.tokenizer if spec.calibration and spec.calibration.tokenizer
                               else spec.model.path)
    options = {"data": data, "probes": probes, "seq_len": seq_len, "max_tokens": max_tokens,
               "probe_samples": probe_samples, "seed": seed}
    results = ctx.report.setdefault("evaluation", {})
    models = ([("original", ctx.analysis.model)] if "original" not in results else []) + [(label, ctx.pruned_model)]
    for name, model in models:
        with ctx.console.status(f"evaluating the {name} model..."):
            results[name] = evaluate_model(model, tokenizer, **options)
    return PassResult(summary={"perplexity": {k: round(v["perplexity"], 3) for k, v in results.items()}})
