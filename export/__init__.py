"""Deployment back ends (importable as `graphprune.export`): Hugging Face, ONNX, TensorRT-LLM, and any
format a plugin registers with `@register_format` (one module each: hf.py, onnx.py, trtllm.py).

`export_model` writes an in-memory model into a folder (the `export` pass of apply uses it);
`export_path` is `graphprune export`: load a model folder, write the format atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from graphprune.errors import UserError
from graphprune.registry import Registry

FORMATS = Registry("export format", "graphprune.formats",
                   ("graphprune.export.hf", "graphprune.export.onnx", "graphprune.export.trtllm"))
register_format = FORMATS.register
"""`@register_format("name", options=OptionsModel)` on `fn(model, folder, tokenizer_from, options) -> summary`:
write `model` into `folder` (created); raise ValueError when the model cannot be carried."""


class ExportError(UserError, ValueError):
    """The model cannot be exported in the asked format; the message says why and what would work."""


def export_model(model: nn.Module, fmt: str, folder: Path, tokenizer_from: str | Path | None = None,
                 **options: Any) -> dict[str, Any]:
    """Write `model` in format `fmt` into `folder`; returns a summary (format, files, checks)."""
    backend = FORMATS.get(fmt, "--format")
    checked = backend.checked_options(options, f"export.options.{fmt}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        summary = backend.fn(model, folder, tokenizer_from, checked) or {}
    except ExportError:
        raise
    except ValueError as err:  # a family, layer kind or config rule the format cannot carry
        raise ExportError(f"{fmt}: {err}") from None
    return {"format": fmt, "folder": str(folder), "files": sorted(p.name for p in folder.iterdir()), **summary}


def export_path(model_path: str, fmt: str, out: Path, *, force: bool = False, **options: Any) -> dict[str, Any]:
    """`graphprune export`: load the model folder (or hub id) and write `fmt` into `out`, atomically."""
    from transformers import AutoModelForCausalLM

    from graphprune.outputs import AtomicOutput
    from graphprune.trace import is_model_source

    backend = FORMATS.get(fmt, "--format")
    backend.checked_options(options, f"export.options.{fmt}")  # before the model loads
    if not is_model_source(model_path):
        raise ExportError(f"{model_path}: no such model folder")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").eval()  # onnx converts to float32 itself
    model_folder = {"the model folder": Path(model_path)} if Path(model_path).is_dir() else {}
    with AtomicOutput(Path(out), force, inputs=model_folder) as workdir:
        summary = export_model(model, fmt, workdir, tokenizer_from=model_path if Path(model_path).is_dir() else None,
                               **options)
    return {**summary, "folder": str(out)}


__all__ = ["FORMATS", "ExportError", "export_model", "export_path", "register_format"]
