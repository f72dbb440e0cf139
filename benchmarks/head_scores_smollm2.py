"""Diagnosis: how well does each query-head score predict the true cost of removing the head?

On SmolLM2-135M (PEERS.md protocol data), per layer, the Spearman rank correlation between each
score (activation, magnitude, taylor, removal on one sequence) and the true cost: KL of the logits
with the head masked at the input of o_proj, on other calibration sequences. Also checks that
graphprune's activation scores use the model's own head order (a direct o_proj-input hook).

    .venv/bin/python benchmarks/head_scores_smollm2.py [--truth-samples 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from smollm2_peers import RESULTS, WINDOW, converted_checkpoint, protocol_data


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--truth-samples", type=int, default=2)
    parser.add_argument("--calibration", type=int, default=32)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from graphprune import analyze
    from graphprune.data import token_samples, load_texts
    from graphprune.importance import (activation_sites, collect_activations, collect_removal, collect_taylor,
                                       magnitude_scores, mask_sites, unit_scores)
    from graphprune.spec import DataSpec

    torch.manual_seed(0)
    checkpoint = converted_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    _, calibration = protocol_data(tokenizer)
    samples = token_samples(load_texts(DataSpec(path=str(calibration))), tokenizer, args.calibration + args.truth_samples + 1,
                            WINDOW, True, 0, allow_fewer=True)
    truth_set, removal_set, score_set = (samples[:args.truth_samples], samples[args.truth_samples:args.truth_samples + 1],
                                         samples[args.truth_samples + 1:])
    analysis = analyze(str(checkpoint))
    model = analysis.model.eval()
    heads = analysis.groups_of_kind("attention_heads")
    layers = [model.get_submodule(layer.module) for layer in analysis.layers]
    batches = list(score_set.split(4))
    timings, scores = {}, {name: {} for name in ("activation", "magnitude", "taylor", "removal_1seq", "truth")}

    start = time.perf_counter()
    sites = [s for g in heads for s in activation_sites(analysis, g)]
    stats = collect_activations(model, sites, batches)
    for g in heads:
        scores["activation"][g.name] = unit_scores(g, activation_sites(analysis, g), stats)
    timings["activation"] = time.perf_counter() - start
    # the same score computed directly in the model's head order: [.., heads * head_dim] at o_proj's input
    direct = {}
    hooks = [layer.self_attn.o_proj.register_forward_hook(
        lambda m, a, o, i=i: direct.__setitem__(i, direct.get(i, 0) + a[0].abs().mean(1).pow(2).sum(0)))
        for i, layer in enumerate(layers)]
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    order_error = max(float((direct[i].sqrt().view(9, 64).norm(dim=1) - scores["activation"][g.name]).abs().max())
                      for i, g in enumerate(heads))
    for g in heads:
        scores["magnitude"][g.name] = magnitude_scores(model, g)
    start = time.perf_counter()
    groups = {g.name: (g, mask_sites(analysis, g)) for g in heads}
    scores["taylor"] = collect_taylor(model, groups, batches)
    timings["taylor"] = time.perf_counter() - start
    start = time.perf_counter()
    scores["removal_1seq"] = collect_removal(model, layers, groups, [removal_set])
    timings["removal_1seq"] = time.perf_counter() - start
    start = time.perf_counter()
    scores["truth"] = collect_removal(model, layers, groups, list(truth_set.split(1)))
    timings["truth"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    timings["bare_forward"] = time.perf_counter() - start

    table = {}
    for method in ("activation", "magnitude", "taylor", "removal_1seq"):
        per_layer = [spearman(scores[method][g.name], scores["truth"][g.name]) for g in heads]
        table[method] = {"mean": round(sum(per_layer) / len(per_layer), 3), "per_layer": [round(r, 2) for r in per_layer]}
    result = {"head_order_max_abs_difference": order_error, "spearman_vs_true_removal_kl": table,
              "seconds": {k: round(v, 1) for k, v in timings.items()},
              "truth_kl_per_layer_max": [round(float(scores["truth"][g.name].max()), 4) for g in heads],
              "truth_kl_per_layer_min": [round(float(scores["truth"][g.name].min()), 5) for g in heads],
              "samples": {"truth": args.truth_samples, "removal": 1, "scores": len(score_set)}}
    out = RESULTS.with_name("head_scores_smollm2.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
