"""The Hugging Face checkpoint: the one writer every graphprune output goes through.

`save_pretrained` writes the hub weight layout (Nemotron-H: ``backbone.*``) and safetensors; on top
of it the family adds the config keys other runtimes read and transformers does not write
(TensorRT-LLM and vLLM: ``hybrid_override_pattern``, ``num_hidden_layers``, ``attention_head_dim``,
``rms_norm_eps``; FORMATS.md), and the tokenizer files are copied so the folder is self-contained.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from . import register_format

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def config_extras(model: nn.Module) -> dict[str, Any]:
    """The family's extra config keys for `model` (none for models without a written family)."""
    from graphprune.families import written_family

    family = written_family(model)
    return family.export_extras(model.config) if family is not None else {}


@register_format("hf")
def write_hf(model: nn.Module, folder: Path, tokenizer_from: str | Path | None, options: Any) -> dict[str, Any]:
    """A Hugging Face checkpoint (safetensors, config with the family's runtime keys, tokenizer)."""
    write_hf_checkpoint(model, folder, tokenizer_from)
    return {}


def write_hf_checkpoint(model: nn.Module, folder: Path, tokenizer_from: str | Path | None = None) -> None:
    """Write `model` into `folder` (created if needed; model files replaced one by one, each atomically)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(".writing-*"):  # of a killed write: inside the folder, so never beside it
        shutil.rmtree(leftover, ignore_errors=True)
    temporary = folder / f".writing-{os.getpid()}"
    try:
        model.save_pretrained(temporary, safe_serialization=True)
        config_path = temporary / "config.json"
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | config_extras(model),
                                          indent=2) + "\n")
        written = {item.name for item in temporary.iterdir()}
        mode = 0o666 & ~_umask()  # safetensors writes 0600; the checkpoint is as readable as the other files
        for item in temporary.iterdir():
            os.chmod(item, mode)
            os.replace(item, folder / item.name)
        for stale in folder.glob("model*.safetensors*"):  # shards of an earlier save that this one did not write
            if stale.name not in written:
                stale.unlink()
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    if tokenizer_from is not None:
        copy_tokenizer(Path(tokenizer_from), folder)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def copy_tokenizer(source: Path, out: Path) -> bool:
    """Copy the tokenizer files of folder `source` into `out`; False when `source` has none."""
    if not source.is_dir() or not any((source / name).is_file() for name in TOKENIZER_FILES):
        return False
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, out / name)
    return True
