"""ONNX export of hybrid Mamba2 / attention / MLP models (every family with a stateful layout: Nemotron-H,
Mamba2, dense GraniteMoeHybrid, Bamba, Llama / Qwen2 / Mistral): a prefill graph and a decode graph with
explicit state, and a runner.

``prefill.onnx``: ``input_ids [batch, seq]`` -> ``logits [batch, seq, vocab]`` and ``present.<state>``
for every state tensor of `stateful.state_specs` (any prompt length: the chunked scan pads inside
the graph).  ``decode.onnx``: ``input_ids [batch, 1]`` and ``past.<state>`` -> ``logits [batch, 1,
vocab]`` and ``present.<state>``.  ``graphprune_onnx.json`` lists the state tensors so a runtime
can wire one step's ``present`` to the next step's ``past``; `OnnxGenerator` does exactly that with
onnxruntime.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from . import register_format
from .hf import copy_tokenizer
from .stateful import StatefulDecode, StatefulPrefill, example_length, state_specs

MANIFEST = "graphprune_onnx.json"
PREFILL, DECODE = "prefill.onnx", "decode.onnx"
OPSET = 18
EXTERNAL_DATA_BYTES = 1_500_000_000


def _dims():
    from torch.export import Dim

    return Dim("batch", min=1, max=4096), Dim("seq", min=1, max=1 << 20), Dim("past", min=1, max=1 << 20)


def _state_shapes(model: torch.nn.Module, batch_dim, past_dim) -> tuple[dict[int, Any], ...]:
    symbols = {"batch": batch_dim, "past": past_dim}
    return tuple({axis: symbols[d] for axis, d in enumerate(s.shape) if isinstance(d, str)} for s in state_specs(model))


@register_format("onnx")
def write_onnx(model: torch.nn.Module, folder: Path, tokenizer_from: str | Path | None, options: Any) -> dict[str, Any]:
    """Prefill and decode graphs with explicit state (float32), their manifest and the tokenizer."""
    summary = {"states": len(export_onnx(model, folder)["states"])}
    if tokenizer_from is not None:
        copy_tokenizer(Path(tokenizer_from), folder)
    return summary


def export_onnx(model: torch.nn.Module, out: Path) -> dict[str, Any]:
    """Write prefill.onnx, decode.onnx and the manifest into `out`; returns the manifest."""
    dtype, training = model.dtype, model.training
    model.float().eval()  # ONNX graphs in float32; the caller's model is given back as it was
    try:
        return _export_graphs(model, out)
    finally:
        model.to(dtype).train(training)


def _export_graphs(model: torch.nn.Module, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    specs = state_specs(model)
    names = [s.name for s in specs]
    batch, seq, past = _dims()
    vocab = model.config.vocab_size
    # Example sizes above 1 so that torch.export keeps the dimensions symbolic.
    ids = torch.randint(0, vocab, (2, example_length(model)))
    with torch.no_grad():
        _, *state = StatefulPrefill(model)(ids)
    # protobuf caps a file at 2 GB: larger models keep their weights in <graph>.onnx.data (each graph its own copy)
    external = sum(p.numel() for p in model.parameters()) * 4 > EXTERNAL_DATA_BYTES
    _export(StatefulPrefill(model), (ids,), out / PREFILL, ["input_ids"], ["logits"] + [f"present.{n}" for n in names],
            {"input_ids": {0: batch, 1: seq}}, external)
    _export(StatefulDecode(model), (ids[:, :1], *state), out / DECODE,
            ["input_ids"] + [f"past.{n}" for n in names], ["logits"] + [f"present.{n}" for n in names],
            {"input_ids": {0: batch}, "states": _state_shapes(model, batch, past)}, external)
    manifest = {
        "format": "graphprune-onnx-stateful/1",
        "model_type": model.config.model_type,
        "vocab_size": vocab,
        "opset": OPSET,
        "prefill": PREFILL,
        "decode": DECODE,
        "states": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype).removeprefix("torch.")} for s in specs],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    model.config.save_pretrained(out)  # the architecture beside the graphs (bench counts parameters from it)
    return manifest


def _export(module, args, path: Path, input_names, output_names, dynamic_shapes, external: bool) -> None:
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # it warns about every torchvision op it cannot register
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=dynamic_shapes,
                                        opset_version=OPSET, verbose=False, optimize=True)
    finally:
        exporter_log.setLevel(level)
    program.save(str(path), external_data=external)


class OnnxGenerator:
    """Prefill + greedy decode with onnxruntime over an exported folder."""

    def __init__(self, folder: Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        folder = Path(folder)
        self.manifest = json.loads((folder / MANIFEST).read_text())
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self.prefill_session = ort.InferenceSession(str(folder / self.manifest["prefill"]), options, providers=providers)
        self.decode_session = ort.InferenceSession(str(folder / self.manifest["decode"]), options, providers=providers)
        self.state_names = [s["name"] for s in self.manifest["states"]]

    def prefill(self, input_ids) -> tuple[Any, list[Any]]:
        """(logits, state) for a prompt batch (int64 array [batch, seq])."""
        logits, *state = self.prefill_session.run(None, {"input_ids": input_ids})
        return logits, state

    def decode(self, input_ids, state: list[Any]) -> tuple[Any, list[Any]]:
        feeds = {"input_ids": input_ids, **{f"past.{n}": s for n, s in zip(self.state_names, state)}}
        logits, *state = self.decode_session.run(None, feeds)
        return logits, state

    def generate(self, input_ids, new_tokens: int):
        """Greedy continuation: int64 array [batch, new_tokens]."""
        import numpy as np

        logits, state = self.prefill(np.ascontiguousarray(input_ids, dtype=np.int64))
        tokens = [logits[:, -1].argmax(-1)[:, None]]
        for _ in range(new_tokens - 1):
            logits, state = self.decode(tokens[-1], state)
            tokens.append(logits[:, -1].argmax(-1)[:, None])
        return np.concatenate(tokens, axis=1)
