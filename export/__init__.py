"""Deployment back ends (importable as `graphprune.export`): Hugging Face, ONNX, TensorRT-LLM.

`export_model` writes an in-memory model into a folder (the `export` pass of apply uses it);
`export_path` is `graphprune export`: load a model folder, write the format atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from graphprune.errors import UserError

FORMATS = ("hf", "onnx", "trtllm")


class ExportError(UserError, ValueError):
    """The model cannot be exported in the asked format; the message says why and what would work."""


def export_model(model: nn.Module, fmt: str, folder: Path, tokenizer_from: str | Path | None = None,
                 **options: Any) -> dict[str, Any]:
    """Write `model` in format `fmt` into `folder`; returns a summary (format, files, checks)."""
    from .hf import copy_tokenizer, write_hf_checkpoint

    if fmt not in FORMATS:
        raise ExportError(f"--format: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        write_hf_checkpoint(model, folder, tokenizer_from)
        summary: dict[str, Any] = {}
    elif fmt == "onnx":
        from .onnx import export_onnx

        try:
            summary = {"states": len(export_onnx(model, folder)["states"])}
        except ValueError as err:  # an unsupported family or layer kind
            raise ExportError(f"onnx: {err}") from None
        if tokenizer_from is not None:
            copy_tokenizer(Path(tokenizer_from), folder)
    else:
        from .trtllm import TrtllmLayoutError, export_trtllm

        try:
            summary = export_trtllm(model, folder, tokenizer_from, **options)
        except TrtllmLayoutError as err:
            raise ExportError(f"trtllm: {err}") from None
    return {"format": fmt, "folder": str(folder), "files": sorted(p.name for p in folder.iterdir()), **summary}


def export_path(model_path: str, fmt: str, out: Path, *, force: bool = False, **options: Any) -> dict[str, Any]:
    """`graphprune export`: load the model folder (or hub id) and write `fmt` into `out`, atomically."""
    from transformers import AutoModelForCausalLM

    from graphprune.outputs import AtomicOutput

    if fmt not in FORMATS:
        raise ExportError(f"--format: unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto").eval()  # onnx converts to float32 itself
    model_folder = {"the model folder": Path(model_path)} if Path(model_path).is_dir() else {}
    with AtomicOutput(Path(out), force, inputs=model_folder) as workdir:
        summary = export_model(model, fmt, workdir, tokenizer_from=model_path if Path(model_path).is_dir() else None,
                               **options)
    return {**summary, "folder": str(out)}


__all__ = ["FORMATS", "ExportError", "export_model", "export_path"]
