"""Calibration (and training) text: local files or hub datasets, tokenized and packed."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .spec import CalibrationSpec, DataSpec
from .trace import hub_reachable, offline_mode


class DataError(UserError):
    """The data cannot be read or is too small for what the spec asks."""


def check_data(data: DataSpec, where: str) -> None:
    """Fail early (before any weights change) when a local data file is missing."""
    if data.path is not None and Path(data.path).is_dir():
        raise DataError(f"{where}.path: {data.path} is a folder; give a text file (.txt, .txt.gz, .jsonl, .json, .parquet)")
    if data.path is not None and not Path(data.path).is_file():
        raise DataError(f"{where}.path: {data.path} does not exist")


def load_texts(data: DataSpec) -> list[str]:
    """The documents of a local file or a hub dataset; a clear error naming the source when there are none."""
    if data.dataset is not None:
        texts, source = _hub_texts(data), f"dataset {data.dataset!r} ({data.split})"
    else:
        path = Path(data.path)
        try:
            texts, source = _file_texts(path, data.text_field), str(path)
        except (OSError, EOFError, UnicodeDecodeError, ValueError) as err:  # bad gzip, not UTF-8, not parquet
            reason = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else str(err).splitlines()[0][:200]
            raise DataError(f"{path}: cannot be read: {reason}") from err
    if not texts:
        raise DataError(f"{source}: holds no text")
    return texts


def _file_texts(path: Path, field: str) -> list[str]:
    name = path.name.lower()
    if name.endswith((".txt", ".txt.gz", ".md")):
        docs = [block.strip() for block in read_text(path).split("\n\n")]
        return [d for d in docs if d]
    if name.endswith((".jsonl", ".jsonl.gz", ".json")):
        return _json_texts(path, field)
    if name.endswith(".parquet"):
        return _parquet_texts(path, field)
    raise DataError(f"data.path: unknown file type {path.name}; use .txt, .txt.gz, .jsonl, .json or .parquet")


def read_text(path: Path) -> str:
    """A text file, gzip-compressed when its name ends in .gz."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def _json_texts(path: Path, field: str) -> list[str]:
    raw = read_text(path)
    records: list[Any]
    if path.name.endswith(".json") and raw.lstrip().startswith("["):
        records = _json_value(raw, path)
    else:
        records = [_json_value(line, path, f"line {number}") for number, line in enumerate(raw.splitlines(), 1)
                   if line.strip()]
    texts = []
    for i, record in enumerate(records):
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"{path}: record {i} has no field {field!r} (set data.text_field)")
        if not isinstance(record[field], str):  # never train on the string "None" or "123"
            raise DataError(f"{path}: record {i}: field {field!r} is {type(record[field]).__name__}, not text")
        texts.append(record[field])
    return texts


def _json_value(text: str, path: Path, where: str = "") -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        raise DataError(f"{path}: {where + ': ' if where else ''}not valid JSON ({str(err)[:200]})") from None


def _parquet_texts(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise DataError("reading parquet needs pyarrow: pip install pyarrow") from err
    table = pq.read_table(path, columns=[field])
    values = table.column(field).to_pylist()
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"{path}: row {bad}: field {field!r} is {type(values[bad]).__name__}, not text")
    return values


def _hub_texts(data: DataSpec) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise DataError("data.dataset needs the `datasets` package (pip install datasets) and network") from err
    if not hub_reachable() and not datasets.config.HF_HUB_OFFLINE:
        raise DataError(f"data.dataset: {data.dataset!r} needs the Hugging Face hub, which cannot be reached (set "
                        "HF_HUB_OFFLINE=1 to use a cached copy, or give a local data.path)")
    try:
        dataset = datasets.load_dataset(data.dataset, split=data.split)
    except (OSError, ConnectionError, ValueError) as err:  # offline, no such dataset or split
        raise DataError(f"data.dataset: cannot load {data.dataset!r} (split {data.split!r}): "
                        f"{str(err).splitlines()[0][:200]}") from err
    return [str(row[data.text_field]) for row in dataset]


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        with offline_mode(not Path(name_or_path).exists() and not hub_reachable()):
            return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load a tokenizer from {name_or_path!r}: {str(err).splitlines()[0]}") from err


def check_vocabulary(tokenizer: Any, vocab_size: int, where: str) -> None:
    if len(tokenizer) > vocab_size:
        raise DataError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
                        f"{vocab_size}: they do not belong together")


def token_samples(texts: list[str], tokenizer: Any, num_samples: int, seq_len: int, packing: bool,
                  seed: int, allow_fewer: bool = False) -> torch.Tensor:
    """[num_samples, seq_len] token ids. Packing concatenates documents (EOS between), no padding.

    `allow_fewer` returns what the data gives (at least one sample) instead of failing."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    samples: list[list[int]] = []
    buffer: list[int] = []
    for index in order:
        ids = tokenizer(texts[index], add_special_tokens=False)["input_ids"]
        if packing:
            buffer.extend(ids + ([eos] if eos is not None else []))
            while len(buffer) >= seq_len and len(samples) < num_samples:
                samples.append(buffer[:seq_len])
                buffer = buffer[seq_len:]
        elif len(ids) >= seq_len:  # unpacked: one document per sample, shorter ones skipped
            samples.append(ids[:seq_len])
        if len(samples) == num_samples:
            return torch.tensor(samples, dtype=torch.long)
    if allow_fewer and samples:
        return torch.tensor(samples, dtype=torch.long)
    raise DataError(f"the data gives only {len(samples)} samples of {seq_len} tokens"
                    f"{'' if packing else ' (unpacked: documents shorter than seq_len are skipped)'}, "
                    f"but num_samples={num_samples}; lower num_samples or seq_len, or add data")


def calibration_batches(spec: CalibrationSpec, tokenizer: Any) -> list[torch.Tensor]:
    texts = load_texts(spec.data)
    try:
        samples = token_samples(texts, tokenizer, spec.num_samples, spec.seq_len, spec.packing, spec.seed)
    except DataError as err:
        raise DataError(f"calibration.data ({spec.data.path or spec.data.dataset}): {err}") from None
    if spec.probe_fraction:
        samples = mix_probes(samples, spec.probe_fraction, len(tokenizer), spec.seed, "calibration.probe_fraction")
    return list(samples.split(spec.batch_size))


def mix_probes(samples: torch.Tensor, fraction: float, vocab: int, seed: int, where: str) -> torch.Tensor:
    """`samples` with a seeded `fraction` of its rows replaced by probe sequences, the three kinds in turn."""
    from .demo.probes import COPY_TOKENS, PROBES, make_probe

    if vocab < COPY_TOKENS[1]:
        raise DataError(f"{where}: the probes use token ids up to {COPY_TOKENS[1] - 1} (the demo tokenizer's "
                        f"layout), but this tokenizer has {vocab} tokens")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(samples), generator=generator)[: int(len(samples) * fraction)]
    mixed = samples.clone()
    for i, row in enumerate(rows.tolist()):
        mixed[row] = make_probe(PROBES[i % len(PROBES)], 1, samples.shape[1], seed * 1_000_003 + i).input_ids[0]
    return mixed
