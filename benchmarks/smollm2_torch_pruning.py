"""Peer reproduction: Torch-Pruning 1.6.1 (Taylor, query heads + FFN) on SmolLM2-135M, protocol of ../shared/PEERS.md.

Follows Torch-Pruning's LLM example (examples/LLMs/prune_llm.py): MetaPruner with num_heads for q/k/v,
prune_num_heads=True, prune_head_dims=False, head_pruning_ratio for the query heads, pruning_ratio for the
FFN, local (per-layer) ratios (global_pruning=False), round_to=4, lm_head ignored; TaylorImportance over the
gradients of the LM loss summed over the protocol's 32 x 512 calibration windows. The hidden size is kept
(embed_tokens ignored too, which makes the hidden-size group unprunable). Query heads 9 -> 6 (one per KV
group), KV heads stay 3; FFN 1536 -> 1152 (25%) or 640 (50% of the non-embedding parameters).

Each pruned model is saved as a plain Hugging Face checkpoint (config fixed by hand, tokenizer beside) in
~/.cache/graphprune/peers/tp-taylor-{25,50} (embeddings stay tied: with the hidden size kept, Torch-Pruning
never touches them), reloaded with a plain `LlamaForCausalLM.from_pretrained` (default attention), and its
held-out perplexity is stored in results/smollm2_torch_pruning.json. Needs, once, besides what
smollm2_peers.py needs:

    .venv/bin/pip install ~/.cache/graphprune/torch_pruning-1.6.1-py3-none-any.whl
    .venv/bin/python benchmarks/smollm2_torch_pruning.py [--only tp-taylor-25 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch_pruning as tp
from transformers import AutoTokenizer, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from smollm2_peers import (CALIBRATION_SEQUENCES, NON_EMBEDDING, WINDOW, arch, converted_checkpoint,  # noqa: E402
                           perplexity, protocol_data)

PEERS = Path.home() / ".cache" / "graphprune" / "peers"
RESULTS = ROOT / "results" / "smollm2_torch_pruning.json"
RUNS = {"tp-taylor-25": 1152, "tp-taylor-50": 640}  # name -> FFN width; query heads 9 -> 6 in both
HEADS_KEPT, BATCH = 6, 2


def calibration_windows(tokenizer, text_file: Path) -> torch.Tensor:
    """The protocol's calibration: the first titles' text as one string, its first 32 x 512 tokens."""
    ids = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    needed = CALIBRATION_SEQUENCES * WINDOW
    assert len(ids) >= needed, len(ids)
    return torch.tensor(ids[:needed]).view(CALIBRATION_SEQUENCES, WINDOW)


def prune(checkpoint: Path, calibration: torch.Tensor, ffn: int) -> tuple[LlamaForCausalLM, dict]:
    # eager attention: on SDPA's GQA path (enable_gqa) Torch-Pruning does not couple k/v with q and crashes
    # (imp.view(9, -1) on a 192-wide group); eager's repeat_kv it traces. transformers' rotate_half needs no patch
    # with torch 2.13 / transformers 5.24 (graph built in ~4 s, the same pruning as with a slice-free rotate_half).
    model = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, attn_implementation="eager").eval()
    config, seconds = model.config, {}
    num_heads = {}
    for layer in model.model.layers:
        attention = layer.self_attn
        num_heads[attention.q_proj] = config.num_attention_heads
        num_heads[attention.k_proj] = num_heads[attention.v_proj] = config.num_key_value_heads
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model, example_inputs={"input_ids": calibration[:1, :16], "use_cache": False},
        importance=tp.importance.TaylorImportance(), global_pruning=False,
        pruning_ratio=1 - (ffn + 0.5) / config.intermediate_size,  # +0.5: int() in TP must land on ffn
        ignored_layers=[model.lm_head, model.model.embed_tokens],  # embed_tokens: keep the hidden size
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        # 3/9, not 1 - 6/9 (0.33333333333333337): TP removes ceil(ratio * 9) = 4 heads then, rounded up to 2 per
        # KV group; q is left with 3 heads = KV heads, TP no longer sees GQA and silently skips every attention
        head_pruning_ratio=(config.num_attention_heads - HEADS_KEPT) / config.num_attention_heads, round_to=4)
    seconds["build"] = time.perf_counter() - start

    start = time.perf_counter()
    model.zero_grad()
    for batch in calibration.split(BATCH):  # Taylor: |w * dL/dw|, gradients summed over the calibration set
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    seconds["calibrate"] = time.perf_counter() - start

    start = time.perf_counter()
    pruner.step()
    seconds["prune"] = time.perf_counter() - start
    model.zero_grad(set_to_none=True)

    # Torch-Pruning resizes the Linear layers only: the config must describe what it produced
    q_proj, gate_proj = model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.gate_proj
    config.num_attention_heads = q_proj.out_features // config.head_dim  # head_dim stays 64 (explicit in config)
    config.intermediate_size = gate_proj.out_features
    assert (config.num_attention_heads, config.intermediate_size) == (HEADS_KEPT, ffn), arch(config)
    for layer in model.model.layers:
        assert layer.self_attn.q_proj.out_features == config.num_attention_heads * config.head_dim
        assert layer.self_attn.k_proj.out_features == config.num_key_value_heads * config.head_dim
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == config.intermediate_size
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    config.tie_word_embeddings = tied
    return model, {"seconds": {k: round(v, 1) for k, v in seconds.items()}, "tied_embeddings": tied}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", choices=list(RUNS), help="runs (default: both)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    checkpoint = converted_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    windows, calibration_file = protocol_data(tokenizer)
    calibration = calibration_windows(tokenizer, calibration_file)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for name in args.only or list(RUNS):
        model, row = prune(checkpoint, calibration, RUNS[name])
        out = PEERS / name
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        del model

        model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain reload, default (SDPA) attention
        embedding = model.get_input_embeddings().weight.numel()
        params = sum(p.numel() for p in model.parameters())  # unique parameters (a tied lm_head counts once)
        body = params - embedding - (0 if model.config.tie_word_embeddings else model.lm_head.weight.numel())
        start = time.perf_counter()
        ppl = perplexity(model, windows)
        row = {"arch": arch(model.config), "perplexity": round(ppl, 3), "checkpoint": str(out),
               "removed": round(1 - body / NON_EMBEDDING, 4), "non_embedding": body, "params": params, **row,
               "eval_s": round(time.perf_counter() - start, 1), "calibration": f"{len(calibration)} x {WINDOW}, batch {BATCH}"}
        results[name] = row
        print(name, json.dumps(row), flush=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
