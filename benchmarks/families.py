"""Benchmark: every Mamba2 hybrid and attention family transformers ships, through graphprune.

For each family, a tiny random model (written with save_pretrained) is analysed, pruned on every width
axis its config can express (half of each, in valid steps) plus one layer fewer, written as a standard
checkpoint and reloaded with AutoModelForCausalLM (unpatched). The "reload" figure is the larger of
materialize's check (the model built from the pruned config against the original's traced graph cut
the same way: the generic rewrite, which equals masking where masking is exact) and verify's (the
reloaded checkpoint against that model). Then ONNX prefill + decode against the reloaded model.
A class that computes something from the hidden size (Gemma's embedding scale) is refused by that
check, and the row is re-run without the hidden size. Writes benchmarks/results/families.json and
prints the markdown table of the README.

    .venv/bin/python benchmarks/families.py [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

MAGNITUDE = {"hidden": "magnitude", "ffn": "magnitude", "mamba": "magnitude", "attention": "magnitude",
             "depth": "random"}
COMMON = {"vocab_size": 512, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}


def configs() -> dict[str, object]:
    """Tiny configs whose sizes do not coincide (hidden 48, FFN 40, 12 Mamba heads over 3 groups, ...)."""
    import transformers as t

    attention = {"hidden_size": 48, "intermediate_size": 40, "num_hidden_layers": 3, "num_attention_heads": 6,
                 "num_key_value_heads": 2, **COMMON}
    return {
        "NemotronH": lambda: t.NemotronHConfig(hidden_size=48, intermediate_size=40, hybrid_override_pattern="M-M*-",
                                               num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                               mamba_num_heads=12, mamba_head_dim=8, n_groups=3, ssm_state_size=16,
                                               chunk_size=16, **COMMON),
        "Mamba2": lambda: t.Mamba2Config(hidden_size=48, num_hidden_layers=3, num_heads=12, head_dim=8, n_groups=3,
                                         state_size=16, expand=2, chunk_size=16, **COMMON),
        "GraniteMoeHybrid (dense)": lambda: t.GraniteMoeHybridConfig(
            hidden_size=48, shared_intermediate_size=40, num_hidden_layers=4, num_attention_heads=6,
            num_key_value_heads=2, num_local_experts=0, layer_types=["mamba", "attention", "mamba", "mamba"],
            mamba_n_heads=12, mamba_n_groups=3, mamba_d_state=16, mamba_d_head=8, mamba_expand=2,
            mamba_chunk_size=16, position_embedding_type=None, **COMMON),
        "Bamba": lambda: t.BambaConfig(hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=6,
                                       num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=12,
                                       mamba_n_groups=3, mamba_d_state=16, mamba_d_head=8, mamba_expand=2,
                                       mamba_chunk_size=16, **COMMON),
        "FalconH1": lambda: t.FalconH1Config(hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                                             num_attention_heads=6, num_key_value_heads=2, head_dim=8,
                                             mamba_n_heads=12, mamba_n_groups=3, mamba_d_state=16, mamba_d_head=8,
                                             mamba_d_ssm=96, mamba_expand=2, mamba_chunk_size=16, **COMMON),
        "Zamba2": lambda: t.Zamba2Config(hidden_size=48, intermediate_size=40, num_hidden_layers=4,
                                         num_attention_heads=6, num_key_value_heads=6, mamba_d_state=16,
                                         mamba_headdim=8, n_mamba_heads=12, mamba_ngroups=3, chunk_size=16,
                                         layers_block_type=["mamba", "hybrid", "mamba", "mamba"], **COMMON),
        "Llama": lambda: t.LlamaConfig(head_dim=8, **attention),
        "Qwen2": lambda: t.Qwen2Config(**attention),
        "Qwen3": lambda: t.Qwen3Config(head_dim=8, **attention),
        "Mistral": lambda: t.MistralConfig(head_dim=8, **attention),
        "Phi3 (fused qkv, gate_up)": lambda: t.Phi3Config(**attention),
        "Granite": lambda: t.GraniteConfig(**attention),
        "Olmo2": lambda: t.Olmo2Config(**attention),
        "Gemma2": lambda: t.Gemma2Config(head_dim=8, **attention),
        "GPT-2 (n_inner unset)": lambda: t.GPT2Config(n_embd=48, n_layer=3, n_head=6, n_positions=64, **COMMON),
    }


def widths(analysis) -> dict[str, int]:
    """Half of every axis the family can write, in its balance steps, where the config accepts it."""
    from graphprune.planning import TARGET_KINDS, PlanError, plan_sizes, pruned_config
    from graphprune.spec import TargetsSpec

    targets: dict[str, int] = {}
    for key, kind in TARGET_KINDS.items():
        groups = analysis.groups_of_kind(kind)
        if not groups or getattr(analysis.family, "cannot", lambda k: None)(kind):
            continue
        step = groups[0].balanced_groups
        for fraction in (0.5, 0.75, 0.25):
            value = max(step, int(groups[0].size * fraction) // step * step)
            try:
                pruned_config(analysis, plan_sizes(analysis, TargetsSpec(**targets, **{key: value})).sizes)
            except (PlanError, Exception):  # noqa: BLE001 - the config refuses this size; try the next
                continue
            targets[key] = value
            break
    return targets


def _apply(folder: Path, targets: dict[str, int], out: Path) -> dict[str, object]:
    from graphprune.apply import apply
    from graphprune.spec import parse_spec

    return apply(parse_spec({"model": {"path": str(folder)}, "importance": MAGNITUDE, "targets": targets,
                             "output": str(out), "reconstruct": None}), force=True)


def run_one(name: str, make_config, root: Path) -> dict[str, object]:
    from transformers import AutoModelForCausalLM

    from graphprune import analyze
    from graphprune.apply import apply
    from graphprune.errors import UserError
    from graphprune.spec import parse_spec

    row: dict[str, object] = {"family": name, "analysed": False, "apply": False, "reload_max_dlogit": None,
                              "depth": False, "onnx": False, "onnx_max_dlogit": None}
    start = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(make_config()).eval()
        folder = root / "model"
        model.save_pretrained(folder)
        analysis = analyze(str(folder))
        row["analysed"] = True
        row["class"] = type(analysis.model).__name__
        row["family_module"] = analysis.family.name if analysis.family else "generic"
        row["kinds"] = sorted({g.kind for g in analysis.groups} - {"other"})
        targets = widths(analysis)
        row["targets"] = targets
        if not targets:
            raise RuntimeError("no width axis can be written")
        try:
            report = _apply(folder, targets, root / "widths")
        except UserError as err:  # a class that computes from the hidden size (Gemma's embedding scale)
            if "computes differently" not in str(err) or "hidden_size" not in targets:
                raise
            row["refused"] = f"hidden_size: {str(err).split(':')[1].strip()[:120]}"
            targets = {k: v for k, v in targets.items() if k != "hidden_size"}
            row["targets"] = targets
            report = _apply(folder, targets, root / "widths")
        reloaded = AutoModelForCausalLM.from_pretrained(root / "widths").eval()
        row["apply"] = True
        materialize = next(p for p in report["passes"] if p["name"] == "materialize")
        verify = next(p for p in report["passes"] if p["name"] == "verify")
        ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got = reloaded(input_ids=ids, use_cache=False).logits
        # the reloaded checkpoint against the in-memory model, which materialize compared with the original's
        # traced graph cut the same way
        row["reload_max_dlogit"] = max(materialize["sliced_graph_max_dlogit"], verify["max_abs_logit_diff"])
        depth = parse_spec({"model": {"path": str(folder)}, "importance": MAGNITUDE,
                            "targets": {"num_layers": len(analysis.layers) - 1}, "output": str(root / "depth"),
                            "reconstruct": None})
        apply(depth, force=True)
        AutoModelForCausalLM.from_pretrained(root / "depth")
        row["depth"] = True
        from graphprune.export import export_model

        from graphprune.export.onnx import OnnxGenerator

        generator = OnnxGenerator(export_model(reloaded, "onnx", root / "onnx")["folder"])
        full = got.numpy()  # prefill all but two tokens, then decode them
        logits, state = generator.prefill(ids[:, :-2].numpy())
        worst = float(abs(logits - full[:, :-2]).max())
        for t in (ids.shape[1] - 2, ids.shape[1] - 1):
            logits, state = generator.decode(ids[:, t:t + 1].numpy(), state)
            worst = max(worst, float(abs(logits[:, 0] - full[:, t]).max()))
        row["onnx"], row["onnx_max_dlogit"] = True, worst
    except Exception as err:  # noqa: BLE001 - a row records where and why a family stops
        row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"
        row["where"] = traceback.extract_tb(err.__traceback__)[-1].name
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    rows = []
    for name, make_config in configs().items():
        if args.only and not any(o.lower() in name.lower() for o in args.only):
            continue
        with tempfile.TemporaryDirectory() as tmp:
            row = run_one(name, make_config, Path(tmp))
        print(json.dumps(row), flush=True)
        rows.append(row)
    out = ROOT / "benchmarks" / "results" / "families.json"
    if args.only and out.is_file():  # a partial run replaces its rows in the record
        fresh = {r["family"]: r for r in rows}
        rows = [fresh.pop(r["family"], r) for r in json.loads(out.read_text())] + list(fresh.values())
    out.write_text(json.dumps(rows, indent=2) + "\n")
    yes = lambda v: "yes" if v else "no"  # noqa: E731
    print("| family | analysed | widths pruned | apply -> checkpoint | reload max abs dlogit | depth | ONNX (max abs dlogit) "
          "| time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        dlogit = f"{r['reload_max_dlogit']:.1e}" if r["reload_max_dlogit"] is not None else "-"
        axes = ", ".join(r.get("targets", {})) or "-"
        print(f"| {r['family']} | {yes(r['analysed'])} | {axes} | {yes(r['apply'])} | {dlogit} | {yes(r['depth'])} | "
              f"{'yes (%.1e)' % r['onnx_max_dlogit'] if r['onnx'] else 'no'} | {r['seconds']} s |")
    for r in rows:
        if "refused" in r:
            print(f"- {r['family']}: refused {r['refused']}")
        if "error" in r:
            print(f"- {r['family']}: {r['error']} (in {r['where']})")


if __name__ == "__main__":
    main()
