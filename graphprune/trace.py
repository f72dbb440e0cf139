"""Front end: load a model from wherever it lives and trace it into an aten graph."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import re
import socket
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError
from torch import nn

from .errors import UserError


class LoadError(UserError):
    """The model source could not be found or read."""


class TraceError(UserError):
    """torch.export could not trace the model."""


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_model(
    source: str | Path | nn.Module,
    *,
    meta: bool = False,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> nn.Module:
    """A model from a module, a local HF directory, a config.json (meta) or a hub id (online users).

    A directory without weights and a bare config file are built on the meta device: shapes and
    parameter counts, no memory.
    """
    if isinstance(source, nn.Module):
        return source
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        return _from_config(_read_config(path, trust_remote_code), dtype)
    if path.is_dir():
        config = _folder_config(path, trust_remote_code)
        has_weights = any((path / name).is_file() for name in WEIGHT_FILES)
        if meta or not has_weights:
            return _from_config(config, dtype)
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                path, config=config, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
                use_safetensors=not (path / "pytorch_model.bin").is_file() or None, output_loading_info=True,
                ignore_mismatched_sizes=True,  # check_loaded names every mis-shaped tensor
            )
        except UNREADABLE_WEIGHTS as err:
            raise LoadError(f"{path}: the weights ({', '.join(n for n in WEIGHT_FILES if (path / n).is_file())}) "
                            f"cannot be read: {_first_line(err)}") from err
        check_loaded(path, model, info)
        return model.to(device).eval()
    if path.exists() or str(source).startswith((".", "/")) or str(source).endswith(".json"):
        raise LoadError(f"model source {source!r} is neither a Hugging Face model folder nor a config .json file")
    return _from_hub(str(source), meta=meta, dtype=dtype, device=device, trust_remote_code=trust_remote_code)


# what a truncated, garbage or hostile weights file raises inside transformers, safetensors and torch.load
UNREADABLE_WEIGHTS = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)


def _folder_config(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise LoadError(f"{path} is a directory without a config.json: not a Hugging Face model folder")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as err:  # empty, not JSON, unknown model_type, bad values
        raise LoadError(f"{path / 'config.json'}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def check_loaded(path: Path, model: nn.Module, info: dict) -> None:
    """Refuse a checkpoint that does not fill the model exactly, or holds non-finite weights: transformers
    would initialise a missing tensor at random with only a warning, and a NaN poisons every score."""
    problems = {kind: sorted(info.get(key) or []) for kind, key in
                (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("mis-shaped", "mismatched_keys"))}
    found = [f"{kind} {', '.join(map(str, names[:5]))}{' ...' if len(names) > 5 else ''}"
             for kind, names in problems.items() if names]
    if found:
        raise LoadError(f"{path}: the weights do not fit {type(model).__name__}: {'; '.join(found)}")
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LoadError(f"{path}: weight {name} holds NaN or infinite values")


def _from_hub(hub_id: str, *, meta: bool, dtype: torch.dtype | None, device: str, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    local_only = not hub_reachable()
    try:
        with offline_mode(local_only):
            if meta:
                return _from_config(AutoConfig.from_pretrained(hub_id, trust_remote_code=trust_remote_code), dtype)
            return AutoModelForCausalLM.from_pretrained(
                hub_id, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code).to(device).eval()
    except OSError as err:
        why = "the hub cannot be reached and it is not in the local cache" if local_only else "no such model?"
        raise LoadError(f"{hub_id!r} is neither a local folder nor a config .json, and loading it as a Hugging Face "
                        f"hub id failed ({why}): {_first_line(err)}") from err


@contextlib.contextmanager
def offline_mode(offline: bool = True):
    """The hub's cache only, like HF_HUB_OFFLINE=1, for this block: an unreachable hub then fails in
    milliseconds instead of a minute of retries (transformers asks huggingface_hub whether it is offline
    at every call; `local_files_only` alone does not reach its adapter lookup)."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """Whether the Hugging Face hub answers (a TCP connect, 3 s at most); False when HF_HUB_OFFLINE is set.
    Behind a proxy the answer is assumed yes: the proxy, not a direct connection, decides."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    address = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((address.hostname, address.port or 443), timeout=3).close()
    except OSError:
        return False
    return True


def _read_config(path: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text(), object_hook=_special_floats)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoadError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise LoadError(f"{path}: a config is a JSON object, not {type(data).__name__}")
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise LoadError(f"{path}: a config needs a 'model_type' (e.g. 'nemotron_h', 'llama', 'mamba2')")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError) as err:  # unknown model_type, or the config class' own validation
        raise LoadError(f"{path}: {str(err).splitlines()[0][:300]}") from err


def _special_floats(obj: dict) -> Any:
    """transformers writes inf/nan (e.g. Mamba's time_step_limit) as {"__float__": "Infinity"}."""
    if set(obj) == {"__float__"}:
        return float(obj["__float__"])
    return obj


def _from_config(config: Any, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    return model.eval()


def is_model_source(name: str) -> bool:
    """An existing folder, or a name shaped like a hub id (`name` or `org/name`): else no model can load."""
    return Path(name).is_dir() or re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) is not None


def default_seq_len(model: nn.Module) -> int:
    """A Mamba chunk (so the chunked scan is traced whole), else a short sequence: the family says."""
    from .families import trace_seq_len

    return trace_seq_len(model)


def example_inputs(model: nn.Module, seq_len: int | None = None, batch: int = 1) -> tuple[tuple, dict[str, Any]]:
    """Token ids for a causal LM (seeded; row 0 is the same at every batch); `use_cache=False` for Hugging Face
    models."""
    seq_len = seq_len or default_seq_len(model)
    device = next(iter(model.parameters())).device
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        raise TraceError(
            f"{type(model).__name__} has no nn.Embedding to make token ids for: pass example_inputs=(args, kwargs)"
        )
    ids = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    if device.type != "meta":
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, embedding.num_embeddings, (1, seq_len), generator=generator)
        if batch > 1:
            ids = torch.cat([ids, torch.randint(0, embedding.num_embeddings, (batch - 1, seq_len), generator=generator)])
        ids = ids.to(device)
    if _is_hugging_face(model):
        return (), {"input_ids": ids, "use_cache": False}
    return (ids,), {}


def _is_hugging_face(model: nn.Module) -> bool:
    from .families import is_hugging_face

    return is_hugging_face(model)


def trace(
    model: nn.Module,
    *,
    seq_len: int | None = None,
    example: tuple[tuple, dict[str, Any]] | None = None,
    dynamic: bool | None = None,
) -> torch.export.ExportedProgram:
    """torch.export (non-strict) on an example input; a failure names the module that broke.

    `dynamic` (the default for modules that are not Hugging Face models: the generic path, whose rewritten
    graph is the pruned model, saved as model.pt2) traces with every dimension of every tensor input
    `Dim.AUTO`: batch and sequence stay symbolic (`sym_size` nodes feed the views) wherever the model's code
    allows, and what it fixes is specialised. The default token ids then have batch 2, as torch.export
    specialises a dimension of size 1 (a size-1 dimension of a given `example` stays fixed). A model that
    cannot be traced symbolically is traced at the example's shape, with a warning: its pruned graph will
    only run at that shape. Hugging Face models are traced at
    the example's shape: their pruned model is rebuilt from its config, and a symbolic trace takes several
    times as long (demo teacher: 1.4 s -> 10 s).
    """
    dynamic = not _is_hugging_face(model) if dynamic is None else dynamic
    args, kwargs = example if example is not None else example_inputs(model, seq_len, batch=2 if dynamic else 1)
    symbolic_failure = None
    if dynamic:
        try:
            exported = _export(model, args, kwargs, every_dim_dynamic(model, args, kwargs))
        except Exception as err:  # retried at the example's shape below; a failure there is the one to report
            symbolic_failure = _first_line(err)
        else:
            if example is not None or 0 in next(iter(symbolic_dims(exported).values()), []):
                return exported
            symbolic_failure = "its code fixes the batch size"  # at 2: retraced at the usual batch 1
        if example is None:
            args, kwargs = example_inputs(model, seq_len)
    try:
        exported = _export(model, args, kwargs, None)
    except Exception as err:  # torch.export raises many types; all become one clear message
        where = _failing_module(model, sys.exc_info()[2])
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraceError(f"torch.export could not trace {type(model).__name__}: {where}: {reason}") from err
    if symbolic_failure is not None:
        warnings.warn(f"torch.export could not trace {type(model).__name__} with a symbolic batch and sequence "
                      f"({symbolic_failure}); traced at the example's shape, so its pruned graph only runs at "
                      f"that shape", stacklevel=2)
    return exported


def _export(model: nn.Module, args: tuple, kwargs: dict[str, Any], dynamic_shapes: Any) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def every_dim_dynamic(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
    """torch.export's `dynamic_shapes` with `Dim.AUTO` on every dimension of every tensor input."""
    shapes = torch.export.ShapesCollection()
    for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            shapes[leaf] = (torch.export.Dim.AUTO,) * leaf.dim()
    return shapes.dynamic_shapes(model, args, kwargs)


def user_inputs(exported: torch.export.ExportedProgram) -> set[str]:
    """The names of a traced graph's placeholders that are the caller's inputs (not weights)."""
    from torch.export.graph_signature import InputKind

    return {spec.arg.name for spec in exported.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT}


def input_shapes(exported: torch.export.ExportedProgram) -> dict[str, list[int | str]]:
    """The shape of each tensor input of a traced graph, by name: "dynamic" where it stayed symbolic."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    users = user_inputs(exported)
    return {node.name: [int(size) if is_concrete_int(size) else "dynamic" for size in node.meta["val"].shape]
            for node in exported.graph.nodes
            if node.op == "placeholder" and node.name in users and isinstance(node.meta.get("val"), torch.Tensor)}


def symbolic_dims(exported: torch.export.ExportedProgram) -> dict[str, list[int]]:
    """The dimensions a traced graph left symbolic, by input name (none for a static trace)."""
    found = {name: [d for d, size in enumerate(shape) if size == "dynamic"]
             for name, shape in input_shapes(exported).items()}
    return {name: dims for name, dims in found.items() if dims}


def _failing_module(model: nn.Module, tb: Any) -> str:
    """The innermost module of `model` whose forward was running when tracing failed."""
    names = {id(m): name for name, m in model.named_modules()}
    found = "in the top-level forward"
    for frame, _ in traceback.walk_tb(tb):
        owner = frame.f_locals.get("self")
        if id(owner) in names and not frame.f_code.co_filename.endswith("torch/nn/modules/module.py"):
            name = names[id(owner)] or "<root>"
            found = f"in module '{name}' ({type(owner).__name__}.{frame.f_code.co_name}, line {frame.f_lineno})"
    return found
