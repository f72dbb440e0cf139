"""evaluate: perplexity and probe accuracies of the original and the pruned model, side by side."""

from __future__ import annotations

from graphprune.data import load_tokenizer
from graphprune.evaluate import evaluate as evaluate_model
from graphprune.pipeline import PassContext, PassResult, register_pass


@register_pass("evaluate", requires=("pruned_model",))
def evaluate(ctx: PassContext, data: str | None = None, probes: list[str] | None = None, seq_len: int = 256,
             max_tokens: int = 16384, probe_samples: int = 64, seed: int = 0) -> PassResult:
    """Held-out perplexity and probes (MQAR, induction, copy) before and after; goes into the report."""
    spec = ctx.spec
    tokenizer = load_tokenizer(spec.calibration.tokenizer if spec.calibration and spec.calibration.tokenizer
                               else spec.model.path)
    options = {"data": data, "probes": probes, "seq_len": seq_len, "max_tokens": max_tokens,
               "probe_samples": probe_samples, "seed": seed}
    results = {}
    for label, model in (("original", ctx.analysis.model), ("pruned", ctx.pruned_model)):
        with ctx.console.status(f"evaluating the {label} model..."):
            results[label] = evaluate_model(model, tokenizer, **options)
    ctx.report["evaluation"] = results
    return PassResult(summary={"perplexity": {k: round(v["perplexity"], 3) for k, v in results.items()}})
