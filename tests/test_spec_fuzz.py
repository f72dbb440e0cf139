"""A seeded spec fuzzer: mutated specs through `apply --dry-run` either plan or raise a user error.

Mutations: wrong types, unknown keys at every level, removed keys, extreme numbers, empty and huge
strings, nulls, deep nesting, and (for specs read from a file) bytes that are not JSON or not UTF-8.
Anything other than a `UserError` is a bug; the test lists the first few with their spec.
"""

import copy
import json
import os
import random
import traceback

import pytest

from checkpoints import nemotron_h_config
from graphprune import apply as apply_module
from graphprune.apply import apply
from graphprune.errors import UserError
from graphprune.spec import load_spec, parse_spec

SPECS_PER_RUN = 500
DEEP = 5000


def deep_list(depth: int):
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def deep_dict(depth: int):
    value: dict = {}
    for _ in range(depth):
        value = {"a": value}
    return value


ODD_VALUES = [None, True, False, 0, -1, 1, 2, 7, 2**31, 2**63, -(2**63), 10**30, 1e30, -1e-30, 0.5, 1.5,
              float("inf"), float("-inf"), float("nan"), "", " ", "x" * 100_000, "\x00", "../..", "~", "/", "cuda",
              "meta", "float16", "taylor", "removal", "onnx", "plan", "distill", "é\u202e", [], {}, [1, 2], [[]],
              {"a": 1}, {"name": "plan"}, ["plan"], deep_list(50), deep_dict(50)]


def base_specs(config_path: str) -> list[dict]:
    """Valid specs touching every section, so that mutations reach every level."""
    calibration = {"data": {"path": "text.txt"}, "num_samples": 4, "seq_len": 32, "batch_size": 2, "seed": 0}
    return [
        {"model": {"path": config_path}, "targets": {"ffn_hidden_size": 64, "hidden_size": 32}},
        {"model": {"path": config_path, "dtype": "bfloat16", "device": "meta"}, "calibration": calibration,
         "importance": {"ffn": "taylor", "mamba": "magnitude", "depth": "cosine", "depth_samples": 2},
         "targets": {"mamba_num_heads": 4, "num_layers": 3}, "output": "out",
         "passes": [{"name": "calibrate"}, {"name": "plan"}, {"name": "prune"}, {"name": "materialize"},
                    {"name": "verify", "args": {"tolerance": 0.01}}],
         "reconstruct": {"ridge": 0.01, "samples": 2}},
        {"model": {"path": config_path}, "calibration": calibration, "targets": {"params": 40_000},
         "distill": {"steps": 2, "seq_len": 16, "lr": 0.001, "top_k": 4, "distributed": "fsdp"},
         "export": {"formats": ["hf", "onnx"], "input_len": 8}, "bench": {"engines": ["torch"], "repeats": 1},
         "search": {"space": {"hidden_size": {"values": [32, 48]}}, "top_k": 2, "max_candidates": 4}},
    ]


def paths(node, prefix=()):
    """Every location in a JSON tree down to 12 levels, the root included."""
    yield prefix
    if len(prefix) >= 12:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            yield from paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from paths(value, prefix + (index,))


def mutate(spec: dict, rng: random.Random) -> object:
    spec = copy.deepcopy(spec)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        where = rng.choice(list(paths(spec)))
        if not where:
            if rng.random() < 0.1:
                return rng.choice(ODD_VALUES)
            continue
        parent = spec
        for part in where[:-1]:
            parent = parent[part]
        key = where[-1]
        operation = rng.choice(["replace", "replace", "replace", "delete", "unknown_key", "wrap", "deep"])
        if operation == "replace":
            parent[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif operation == "delete" and isinstance(parent, dict):
            del parent[key]
        elif operation == "unknown_key" and isinstance(parent[key], dict):
            parent[key][rng.choice(["speed", "", "x" * 300, "Model", "__class__"])] = rng.choice(ODD_VALUES[:20])
        elif operation == "wrap":
            parent[key] = [parent[key]] if rng.random() < 0.5 else {"value": parent[key]}
        elif operation == "deep":
            parent[key] = deep_dict(DEEP) if rng.random() < 0.5 else deep_list(DEEP)
    return spec


def corrupt_bytes(text: bytes, rng: random.Random) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return text[: rng.randrange(len(text))]
    if choice == 1:
        position = rng.randrange(len(text))
        return text[:position] + bytes([rng.randrange(256)]) + text[position + 1:]
    if choice == 2:
        return text.decode().encode("utf-16")
    if choice == 3:
        return b"[" * DEEP + b"]" * DEEP
    return bytes(rng.randrange(256) for _ in range(64))


@pytest.fixture
def cached_analysis(monkeypatch):
    """Trace the base model once: the fuzzer is about specs, not tracing (any other path is analysed for real)."""
    real, cache = apply_module.analyze, {}

    def analyze(source, **kwargs):
        key = (str(source), tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = real(source, **kwargs)
        return cache[key]

    monkeypatch.setattr(apply_module, "analyze", analyze)


def test_mutated_specs_plan_or_raise_a_user_error(tmp_path, monkeypatch, cached_analysis):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    nemotron_h_config().save_pretrained(tmp_path / "model")
    (tmp_path / "text.txt").write_text("some text " * 200)
    bases = base_specs(str(tmp_path / "model" / "config.json"))
    for base in bases:  # the bases themselves are valid
        apply(load_spec(_written(tmp_path / "base.json", json.dumps(base).encode())), dry_run=True)
    rng = random.Random(int(os.environ.get("GRAPHPRUNE_FUZZ_SEED", "20261202")))  # another seed explores further
    outcomes = {"planned": 0, "user error": 0}
    bugs = []
    for index in range(SPECS_PER_RUN):
        mutated = mutate(rng.choice(bases), rng)
        try:
            if index % 5 == 0:  # through a file: JSON text, sometimes corrupted bytes
                text = _dumped(mutated).encode()
                spec = load_spec(_written(tmp_path / "spec.json", corrupt_bytes(text, rng) if index % 10 == 0 else text))
            else:
                spec = parse_spec(mutated)
            apply(spec, dry_run=True)
            outcomes["planned"] += 1
        except UserError as err:
            outcomes["user error"] += 1
            assert len(str(err)) < 5_000, f"an error message of {len(str(err)):,} characters"
        except Exception:  # noqa: BLE001 - every other exception is a bug to report
            bugs.append((_dumped(mutated)[:300], traceback.format_exc()[-1500:]))
    print(f"fuzzed {SPECS_PER_RUN} specs: {outcomes}, other exceptions: {len(bugs)}")
    assert not bugs, f"{len(bugs)} specs raised a non-user error; first:\n" + "\n\n".join(
        f"{spec}\n{trace}" for spec, trace in bugs[:3])
    assert outcomes["planned"] >= 30 and outcomes["user error"] >= 100  # the mutations reach both outcomes


def _dumped(spec) -> str:
    try:
        return json.dumps(spec)
    except RecursionError:  # too deep for Python's encoder; the file reader must refuse it all the same
        return "[" * DEEP + "]" * DEEP
    except ValueError:  # not JSON-encodable (NaN is, as a bare token)
        return repr(spec)


def _written(path, content: bytes):
    path.write_bytes(content)
    return path
