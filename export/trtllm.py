"""TensorRT-LLM: the checkpoint its PyTorch backend loads for NemotronHForCausalLM, plus what to run it.

TensorRT-LLM builds Nemotron-H straight from a Hugging Face folder (no engine build; the legacy
`trtllm-build` path supports pure Mamba only).  Its model code reads ``hybrid_override_pattern``,
``head_dim``, ``rms_norm_eps``/``layer_norm_epsilon``, the Mamba sizes, and its weight mapper expects
the hub layout (``backbone.*``, ``embeddings``, ``A_log``, in_proj rows ``[z, x, B, C, dt]``); see
FORMATS.md.  `check_checkpoint` verifies a folder against exactly those rules, reading only the
config and the safetensors headers, so it runs on a CPU machine and on 8B checkpoints in seconds.

The output folder is the model folder itself, with:
``extra_llm_api_options.yaml`` (KV/SSM cache settings), ``dataset.jsonl`` (synthetic requests in
trtllm-bench's format) and ``README.md`` (the exact trtllm-bench commands).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from graphprune.families.nemotron_h import KIND_OF_BLOCK, NEMOTRON_H, PATTERN_CHARACTERS as PATTERN_KINDS

from . import register_format
from .hf import config_extras, write_hf_checkpoint

OPTIONS_FILE = "extra_llm_api_options.yaml"
DATASET_FILE = "dataset.jsonl"
EXTRA_OPTIONS = """\
# TensorRT-LLM LLM-API options for NemotronH (hybrid Mamba2): no block reuse for SSM state,
# SSM state in float32 as the model was trained.
kv_cache_config:
  enable_block_reuse: false
  mamba_ssm_cache_dtype: float32
"""


class TrtllmLayoutError(ValueError):
    """The checkpoint would not load in TensorRT-LLM; the message lists every broken rule."""


class TrtllmOptions(BaseModel):
    """The benchmark dataset written beside the checkpoint (`trtllm-bench`)."""

    model_config = ConfigDict(extra="forbid")
    input_len: int = Field(128, ge=1)
    """Prompt tokens per request."""
    output_len: int = Field(128, ge=1)
    """Generated tokens per request."""
    num_requests: int = Field(256, ge=1)
    """Requests in the dataset."""
    seed: int = 0


@register_format("trtllm", options=TrtllmOptions)
def write_trtllm(model: nn.Module, folder: Path, tokenizer_from: str | Path | None,
                 options: TrtllmOptions) -> dict[str, Any]:
    """The checkpoint TensorRT-LLM's PyTorch backend loads, its LLM-API options and a benchmark dataset."""
    return export_trtllm(model, folder, tokenizer_from, **options.model_dump())


def export_trtllm(model: nn.Module, folder: Path, tokenizer_from: str | Path | None = None, *, input_len: int = 128,
                  output_len: int = 128, num_requests: int = 256, seed: int = 0) -> dict[str, Any]:
    problems = config_problems(model.config.to_dict() | config_extras(model))
    if problems:
        raise TrtllmLayoutError("TensorRT-LLM cannot load this model:\n- " + "\n- ".join(problems))
    write_hf_checkpoint(model, folder, tokenizer_from)
    (folder / OPTIONS_FILE).write_text(EXTRA_OPTIONS)
    write_dataset(folder / DATASET_FILE, model.config.vocab_size, input_len, output_len, num_requests, seed)
    (folder / "README.md").write_text(_readme(folder, input_len, output_len, num_requests))
    problems = check_checkpoint(folder)
    if problems:
        raise TrtllmLayoutError("the written checkpoint breaks TensorRT-LLM's rules:\n- " + "\n- ".join(problems))
    return {"options": OPTIONS_FILE, "dataset": DATASET_FILE, "requests": num_requests}


def write_dataset(path: Path, vocab: int, input_len: int, output_len: int, requests: int, seed: int) -> None:
    """Synthetic requests (random token ids, fixed lengths), one JSON object per line, as trtllm-bench reads."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for task in range(requests):
            ids = [rng.randrange(vocab) for _ in range(input_len)]
            out.write(json.dumps({"task_id": task, "input_ids": ids, "output_tokens": output_len}) + "\n")


def _readme(folder: Path, input_len: int, output_len: int, requests: int) -> str:
    return f"""# TensorRT-LLM deployment of this checkpoint

This folder is a Hugging Face `NemotronHForCausalLM` checkpoint that TensorRT-LLM's PyTorch backend
loads as it is (no engine build). Written by `graphprune export --format trtllm`.

Serve it:

    trtllm-serve . --backend pytorch --extra_llm_api_options {OPTIONS_FILE}

Measure throughput on the included dataset ({requests} requests, {input_len} input and {output_len}
output tokens each):

    trtllm-bench --model NemotronHForCausalLM --model_path . throughput \\
        --dataset {DATASET_FILE} --backend pytorch --extra_llm_api_options {OPTIONS_FILE} \\
        --max_batch_size 64 --report_json trtllm_report.json

(Newer releases also accept `--config` for `--extra_llm_api_options`.)  The SSM cache is kept in
float32: TensorRT-LLM falls back from its fast Mamba kernels for some head sizes, and a bfloat16
state has been seen to ruin accuracy there.

Another length mix:

    trtllm-bench --model NemotronHForCausalLM --model_path . prepare-dataset --output my_dataset.jsonl \\
        token-norm-dist --num-requests 512 --input-mean 1024 --input-stdev 0 --output-mean 256 --output-stdev 0

`graphprune bench . --engine trtllm` measures the same through the LLM API, side by side with other models.
"""


# ------------------------------------------------------------------------------------------ checks


def config_problems(config: dict[str, Any], tp_size: int = 1) -> list[str]:
    """Broken config rules (empty when TensorRT-LLM's NemotronH model code can build the model).

    From TensorRT-LLM's `_torch/models/modeling_nemotron_h.py`, `configs/nemotron_h.py` and
    `modules/mamba/mamba2_tp.py`; it builds its layers from `hybrid_override_pattern`.
    """
    problems = []
    if config.get("model_type") != "nemotron_h":
        return [f"model_type is {config.get('model_type')!r}; TensorRT-LLM's NemotronH path needs 'nemotron_h'"]
    pattern = config.get("hybrid_override_pattern")
    if not isinstance(pattern, str) or not pattern:
        problems.append("config.hybrid_override_pattern is missing (TensorRT-LLM builds its layers from it)")
        pattern = ""
    elif set(pattern) - set(PATTERN_KINDS):
        problems.append(f"hybrid_override_pattern {pattern!r} has characters outside {''.join(PATTERN_KINDS)}")
    layers = config.get("num_hidden_layers")
    if layers != len(pattern):
        problems.append(f"num_hidden_layers ({layers}) differs from len(hybrid_override_pattern) ({len(pattern)})")
    kinds = config.get("layers_block_type")
    if kinds is not None and pattern and [PATTERN_KINDS.get(c) for c in pattern] != _short_kinds(kinds):
        problems.append("hybrid_override_pattern does not spell layers_block_type")
    for first, second in (("head_dim", "attention_head_dim"), ("layer_norm_epsilon", "rms_norm_eps")):
        if config.get(first) is None or config.get(second) is None:
            problems.append(f"config needs both {first} and {second}")
        elif config[first] != config[second]:
            problems.append(f"{first} ({config[first]}) and {second} ({config[second]}) differ")
    heads, groups = config.get("mamba_num_heads"), config.get("n_groups")
    if "M" in pattern:
        if not heads or not groups or heads % groups:
            problems.append(f"mamba_num_heads ({heads}) must be a positive multiple of n_groups ({groups})")
        if config.get("conv_kernel") not in (2, 3, 4):  # TensorRT-LLM's causal_conv1d kernel
            problems.append(f"conv_kernel ({config.get('conv_kernel')}) must be 2, 3 or 4")
    attention_heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if "*" in pattern and (not attention_heads or not kv_heads or attention_heads % kv_heads):
        problems.append(f"num_attention_heads ({attention_heads}) must be a multiple of num_key_value_heads ({kv_heads})")
    return problems + tensor_parallel_problems(config, tp_size)


def tensor_parallel_problems(config: dict[str, Any], tp_size: int) -> list[str]:
    """TensorRT-LLM's tensor-parallel rules for Mamba heads, groups and attention heads."""
    if tp_size == 1:
        return []
    problems = [] if tp_size in (2, 4, 8) else [f"tp_size {tp_size}: TensorRT-LLM supports 1, 2, 4 or 8"]
    heads, groups = config.get("mamba_num_heads") or 0, config.get("n_groups") or 1
    if heads % tp_size:
        problems.append(f"mamba_num_heads ({heads}) is not divisible by tp_size {tp_size}")
    if groups % tp_size and tp_size % groups:
        problems.append(f"n_groups ({groups}) and tp_size {tp_size}: one must divide the other")
    if (config.get("num_attention_heads") or 0) % tp_size:
        problems.append(f"num_attention_heads ({config.get('num_attention_heads')}) is not divisible by tp_size {tp_size}")
    return problems


def _short_kinds(kinds: list[str]) -> list[str]:
    return [KIND_OF_BLOCK.get(kind, kind) for kind in kinds]


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the folder's safetensors files (headers only, no weights read)."""
    from safetensors import safe_open

    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def check_checkpoint(folder: Path, tp_size: int = 1) -> list[str]:
    """Every TensorRT-LLM rule the checkpoint in `folder` breaks (config keys, weight names and shapes).

    Every expected weight must be present: TensorRT-LLM silently leaves a module whose weights are all
    missing uninitialised.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return [f"{folder}: no config.json"]
    config = json.loads((folder / "config.json").read_text())
    problems = config_problems(config, tp_size)
    if problems:
        return problems
    have, want = checkpoint_shapes(folder), NEMOTRON_H.hub_weight_shapes(config)
    if not have:
        return [f"{folder}: no .safetensors weights"]
    problems += [f"missing weight {name} {list(shape)}" for name, shape in want.items() if name not in have]
    problems += [f"weight {name} has shape {list(have[name])}, TensorRT-LLM expects {list(shape)}"
                 for name, shape in want.items() if name in have and have[name] != shape]
    problems += [f"unexpected weight {name} (TensorRT-LLM's mapper would not place it)"
                 for name in have if name not in want and not name.startswith("mtp")]
    return problems
