"""`graphprune bench`: prefill and decode throughput and peak memory of models side by side.

Each model runs in its own worker process (``python -m graphprune.bench``), so that peak memory is the
model's own and one model's threads or caches cannot slow the next.  A timed run is one prefill of
``batch x input_len`` random tokens followed by ``output_len - 1`` greedy decode steps.  All workers
load and warm up first; then the parent interleaves their timed runs, one per worker per round, in
alternating order (A B, B A, A B ...), so that a machine's drifting load hits every model alike.
Medians give tokens/s; ratios are taken against the first model, per round (paired) and as the median,
next to the ideal speed-up from the ratio of matmul parameters (embedding lookups cost no FLOPs; on
the torch engine every other weight is read once per token).  Every ratio comes with its spread over
the rounds and a flag when that spread crosses 1.0 or the ratio exceeds the ideal by more than it.

Engines: ``torch`` (transformers' own forward with its cache; on CUDA it uses mamba-ssm's kernels
when they import), ``onnxruntime`` (the prefill/decode graphs of `graphprune export --format onnx`;
a model folder is exported first, by the calling process, so that the worker holds only the runtime) and
``trtllm`` (TensorRT-LLM's LLM API, GPU).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .registry import Registry
from .trace import is_model_source

ENGINES = Registry("bench engine", "graphprune.engines", ("graphprune.bench",))
register_engine = ENGINES.register
"""`@register_engine("name", options=OptionsModel, prepare=..., settings=...)` on
`fn(model_path, settings, options) -> _Timed`, run in the worker process (plugins named in
`BenchSettings.plugins` are imported there first). Hooks, run by the parent: `prepare(model_path, scratch)
-> path` (e.g. export the model first), `settings(models, settings) -> settings`; `reads_export="onnx"`
says which `export` format folder the engine can read as is (apply's bench pass then uses it)."""


class BenchError(UserError, RuntimeError):
    """A benchmark that cannot run as asked (missing engine, unsupported model, failed worker)."""


@dataclass(frozen=True)
class BenchSettings:
    engine: str = "torch"
    batch: int = 1
    input_len: int = 128
    output_len: int = 32
    repeats: int = 3
    warmup: int = 1
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    runner: str = "auto"  # torch engine: "transformers" (its forward and cache) or "stateful" (export/stateful.py)
    options: dict[str, Any] = field(default_factory=dict)  # the engine's own options
    plugins: tuple[str, ...] = ()  # modules the worker imports first (where a plugin engine registers)
    plugin_paths: tuple[str, ...] = ()  # the folders this process imported them from

    @classmethod
    def from_spec(cls, spec: Any, engine: str, device: str, plugins: list[str] | tuple[str, ...] = ()) -> BenchSettings:
        """From a spec's `bench` section (or `search.bench`), for one of its engines; `plugins` (the spec's,
        already imported here) are imported by the worker too."""
        return cls(engine=engine, batch=spec.batch, input_len=spec.input_len, output_len=spec.output_len,
                   repeats=spec.repeats, threads=spec.threads, device=device, options=spec.options.get(engine, {}),
                   plugins=tuple(plugins), plugin_paths=tuple(dict.fromkeys(_import_root(m) for m in plugins)))


@dataclass
class BenchResult:
    model: str
    engine: str
    params: int
    matmul_params: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int
    prefill_seconds: list[float]
    decode_seconds: list[float]
    runner: str = ""  # torch engine: transformers or stateful
    speedup_vs_first: float = 1.0
    prefill_speedup_vs_first: float = 1.0
    decode_speedup_vs_first: float = 1.0
    ideal_speedup_vs_first: float = 1.0
    speedup_range: tuple[float, float] = (1.0, 1.0)  # min and max of the per-round end-to-end ratios
    flags: list[str] = field(default_factory=list)     # why a ratio should not be trusted


def bench(models: list[str], settings: BenchSettings, progress: Callable[[str], None] | None = None,
          labels: list[str] | None = None) -> dict[str, Any]:
    """Benchmark every model in its own process; returns {"settings", "results"} with ratios to the first.

    `labels` name the models in the results (default: their paths)."""
    engine = ENGINES.get(settings.engine, "--engine")
    engine.checked_options(settings.options, f"bench.options.{settings.engine}")
    if min(settings.batch, settings.input_len, settings.output_len, settings.repeats) < 1:
        raise BenchError("--batch, --input-len, --output-len and --repeats must all be at least 1")
    for model in models:
        if not is_model_source(model):
            raise BenchError(f"{model}: no such model folder")
    if "settings" in engine.hooks:
        settings = engine.hooks["settings"](models, settings)
    names = labels or list(models)  # before an ONNX export replaces the paths
    _remove_dead_scratch()
    with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
        if "prepare" in engine.hooks:  # e.g. export here, so that the worker's memory is the runtime's own
            models = [engine.hooks["prepare"](model, Path(scratch) / str(i)) for i, model in enumerate(models)]
        workers = [_Worker(model, settings) for model in models]  # all load and warm up at once, untimed
        try:
            for worker_, label in zip(workers, names):
                if progress:
                    progress(f"{settings.engine}: loading {label}")
                worker_.wait_ready()
            for round_ in range(settings.repeats):
                order = workers if round_ % 2 == 0 else workers[::-1]
                for worker_ in order:
                    if progress:
                        progress(f"{settings.engine}: round {round_ + 1}/{settings.repeats}")
                    worker_.run_once()
            results = [worker_.finish() for worker_ in workers]
        finally:
            for worker_ in workers:
                worker_.stop()
    for result, label in zip(results, names):
        result.model = label
    add_ratios(results)
    return {"settings": asdict(settings), "results": [asdict(r) for r in results]}


SCRATCH_PREFIX = "graphprune-bench-"


def _remove_dead_scratch() -> None:
    """ONNX scratch folders (<temp>/graphprune-bench-<pid>-*) of bench runs that were killed."""
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = path.name[len(SCRATCH_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def add_ratios(results: list[BenchResult]) -> None:
    """Speed-ups against the first model: end to end (prefill + decode time), per phase, and ideal; the
    end-to-end ratio's range over the rounds (round i of each model ran back to back), and flags."""
    first = results[0]
    for result in results:
        result.prefill_speedup_vs_first = result.prefill_tokens_per_s / first.prefill_tokens_per_s
        result.decode_speedup_vs_first = result.decode_tokens_per_s / first.decode_tokens_per_s
        result.speedup_vs_first = end_to_end_seconds(asdict(first)) / end_to_end_seconds(asdict(result))
        result.ideal_speedup_vs_first = first.matmul_params / result.matmul_params
        if result is first:
            continue
        rounds = [(p0 + d0) / (p + d) for p0, d0, p, d in zip(first.prefill_seconds, first.decode_seconds,
                                                              result.prefill_seconds, result.decode_seconds)]
        low, high = min(rounds), max(rounds)
        result.speedup_range = (low, high)
        result.flags = []
        if len(rounds) > 1 and low < 1.0 < high:
            result.flags.append("the rounds disagree on which model is faster: no significant difference")
        spread = high - low
        if result.speedup_vs_first > result.ideal_speedup_vs_first + spread and result.ideal_speedup_vs_first >= 1:
            result.flags.append(f"{result.speedup_vs_first:.2f}x exceeds the ideal {result.ideal_speedup_vs_first:.2f}x "
                                f"by more than the spread ({spread:.2f}): a loaded machine, or a cache effect? rerun "
                                "with more repeats on an idle machine")


def end_to_end_seconds(result: dict[str, Any]) -> float:
    """Median prefill plus median decode time of one result."""
    return statistics.median(result["prefill_seconds"]) + statistics.median(result["decode_seconds"])


class _Worker:
    """One model's worker process, driven line by line: it loads and warms up, then times one run per
    `run`, and reports its result on `done` (python -m graphprune.bench MODEL SETTINGS_JSON)."""

    def __init__(self, model: str, settings: BenchSettings):
        env = dict(os.environ)
        if settings.threads:
            env["OMP_NUM_THREADS"] = str(settings.threads)
        self.model = model
        self.errors = tempfile.TemporaryFile(mode="w+")  # a pipe could fill up and block the worker
        self.process = subprocess.Popen([sys.executable, "-m", "graphprune.bench", model, json.dumps(asdict(settings))],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.errors, text=True,
                                        env=env)

    def _ask(self, command: str | None) -> dict[str, Any]:
        try:
            if command is not None:
                self.process.stdin.write(command + "\n")
                self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            self.process.wait()
            self.errors.seek(0)
            message = self.errors.read().strip().splitlines()
            raise BenchError(f"benchmark of {self.model} failed: {message[-1] if message else 'no output'}")
        return json.loads(line)

    def wait_ready(self) -> None:
        self._ask(None)

    def run_once(self) -> None:
        self._ask("run")

    def finish(self) -> BenchResult:
        return BenchResult(**self._ask("done"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.errors.close()


# ------------------------------------------------------------------------------------------ worker side


@dataclass
class _Timed:
    """What an engine gives the worker: `prefill()` returns the state `decode(state)` continues."""

    prefill: Callable[[], Any]
    decode: Callable[[Any], None]
    sync: Callable[[], None] = lambda: None
    model: Any = None                                   # for the parameter count (None: from the config)
    device_peak: Callable[[], int | None] = lambda: None
    decode_includes_prefill: bool = False               # TensorRT-LLM generates from the prompt each time

    def once(self) -> tuple[float, float]:
        """(prefill seconds, decode seconds) of one run."""
        start = time.perf_counter()
        state = self.prefill()
        self.sync()
        middle = time.perf_counter()
        self.decode(state)
        self.sync()
        end = time.perf_counter()
        prefill, decode = middle - start, end - middle
        return prefill, (max(decode - prefill, 1e-9) if self.decode_includes_prefill else decode)


def _prompt(settings: BenchSettings, vocab: int):
    import torch

    generator = torch.Generator().manual_seed(settings.seed)
    return torch.randint(0, vocab, (settings.batch, settings.input_len), generator=generator)


def _import_root(module: str) -> str:
    """The sys.path folder `module` (imported in this process) was found in."""
    file = getattr(sys.modules.get(module), "__file__", None)
    if file is None:
        return ""
    depth = module.count(".") + (1 if Path(file).name == "__init__.py" else 0)
    return str(Path(file).resolve().parents[depth])


def _one_runner(models: list[str], settings: BenchSettings) -> BenchSettings:
    """One torch runner for every model, so that ratios compare models: stateful when any model's family
    says transformers' cache cannot serve it."""
    if settings.runner != "auto":
        return settings
    return replace(settings, runner="stateful" if any(_cache_fails(_config(m)) for m in models) else "transformers")


@register_engine("torch", settings=_one_runner)
def _torch_engine(path: str, settings: BenchSettings, options: Any = None):
    """transformers' own forward and cache (mamba-ssm kernels on CUDA when they import)."""
    import torch
    from transformers import AutoModelForCausalLM

    if settings.threads:
        torch.set_num_threads(settings.threads)
    dtype = torch.bfloat16 if settings.device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(settings.device).eval()
    ids = _prompt(settings, model.config.vocab_size).to(settings.device)
    cuda = settings.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    if settings.runner == "stateful" or (settings.runner == "auto" and _cache_fails(model.config, model)):
        prefill, decode = _stateful_steps(model, ids, settings)
    else:
        prefill, decode = _transformers_steps(model, ids, settings)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return _Timed(prefill, decode, sync, model, (lambda: torch.cuda.max_memory_allocated()) if cuda else (lambda: None))


def _config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _cache_fails(config, model=None) -> bool:
    """Whether the model's family says transformers' own cache cannot serve it (then decode runs stateful).

    Without a loaded model the family is asked of the architecture built on the meta device (no weights)."""
    from .families import family_for

    if model is None:
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    family = family_for(model)
    return family is not None and family.transformers_cache_fails(config)


def _transformers_steps(model, ids, settings: BenchSettings):
    """Prefill and decode through transformers' own forward and cache (mamba-ssm kernels when importable)."""
    import torch

    def cache_of(out):
        return out.cache if hasattr(out, "cache") else out.past_key_values

    @torch.no_grad()
    def prefill():
        out = model(input_ids=ids, use_cache=True)
        return cache_of(out), out.logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def decode(state):
        cache, token = state
        for _ in range(settings.output_len - 1):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = cache_of(out), out.logits.argmax(-1)

    return prefill, decode


def _stateful_steps(model, ids, settings: BenchSettings):
    """Prefill and decode through graphprune's explicit-state runner (export/stateful.py)."""
    import torch

    from .export.stateful import StatefulDecode, StatefulPrefill

    prefill_module, decode_module = StatefulPrefill(model).eval(), StatefulDecode(model).eval()

    @torch.no_grad()
    def prefill():
        logits, *state = prefill_module(ids)
        return state, logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def decode(carry):
        state, token = carry
        for _ in range(settings.output_len - 1):
            logits, *state = decode_module(token, *state)
            token = logits.argmax(-1)

    return prefill, decode


def _onnx_folder(path: str, scratch: Path) -> str:
    """`path` if it is an ONNX export already, else its export into `scratch`."""
    from .export.onnx import MANIFEST

    folder = Path(path)
    if (folder / MANIFEST).is_file():
        return path
    if not (folder / "config.json").is_file():
        raise BenchError(f"{path}: neither an ONNX export folder ({MANIFEST}) nor a Hugging Face model folder")
    from .export import export_path

    export_path(path, "onnx", scratch)
    return str(scratch)


@register_engine("onnxruntime", prepare=_onnx_folder, reads_export="onnx")
def _onnx_engine(path: str, settings: BenchSettings, options: Any = None):
    """The prefill/decode graphs of `graphprune export --format onnx` in onnxruntime."""
    from .export.onnx import OnnxGenerator

    generator = OnnxGenerator(Path(path), threads=settings.threads)
    ids = _prompt(settings, generator.manifest["vocab_size"]).numpy()

    def prefill():
        logits, state = generator.prefill(ids)
        return logits[:, -1:].argmax(-1), state

    def decode(carry):
        token, state = carry
        for _ in range(settings.output_len - 1):
            logits, state = generator.decode(token, state)
            token = logits[:, -1:].argmax(-1)

    return _Timed(prefill, decode)


@register_engine("trtllm")
def _trtllm_engine(path: str, settings: BenchSettings, options: Any = None):
    """TensorRT-LLM's LLM API (GPU)."""
    try:
        from tensorrt_llm import LLM, SamplingParams
        from tensorrt_llm.llmapi import KvCacheConfig
    except ImportError as err:
        raise BenchError(f"--engine trtllm needs tensorrt_llm, which imports only on a GPU machine "
                         f"(pip install 'graphprune[trtllm]'): {err}") from None
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    llm = LLM(model=path, kv_cache_config=KvCacheConfig(enable_block_reuse=False, mamba_ssm_cache_dtype="float32"))
    prompts = [row.tolist() for row in _prompt(settings, config.vocab_size)]

    def generate(tokens: int):
        llm.generate(prompts, SamplingParams(max_tokens=tokens, ignore_eos=True), use_tqdm=False)

    # TensorRT-LLM runs prefill and decode inside one call: decode time = time(T tokens) - time(1 token)
    def prefill():
        generate(1)

    def decode(_):
        generate(settings.output_len)

    return _Timed(prefill, decode, decode_includes_prefill=True)


def _param_counts(path: str, model: Any) -> tuple[int, int]:
    """(all parameters, matmul parameters: all but the input embedding) of a model or its folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if model is None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def _resident_bytes(field: str) -> int | None:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> int:
    """Start peak-memory accounting now: the resident size at this point is the baseline."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        pass
    return _resident_bytes("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def serve(path: str, settings: BenchSettings, commands, reply: Callable[[dict], None]) -> None:
    """The worker: load and warm up, say ready, time one run per `run` command, report on `done`."""
    baseline = _reset_peak()  # after the interpreter and libraries are loaded: the model's own memory counts
    engine = ENGINES.get(settings.engine, "--engine")
    timed = engine.fn(path, settings, engine.checked_options(settings.options, f"bench.options.{settings.engine}"))
    for _ in range(settings.warmup):
        timed.once()
    reply({"ready": True})
    prefill_times, decode_times = [], []
    for command in commands:
        if command.strip() == "run":
            prefill, decode = timed.once()
            prefill_times.append(prefill)
            decode_times.append(decode)
            reply({"prefill": prefill, "decode": decode})
        elif command.strip() == "done":
            break
    host_peak = _resident_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    device_peak = timed.device_peak()
    peak = device_peak if device_peak is not None else host_peak - baseline
    total, matmul = _param_counts(path, timed.model)
    decode_tokens = settings.batch * max(settings.output_len - 1, 1)
    reply(asdict(BenchResult(
        model=path, engine=settings.engine, params=total, matmul_params=matmul,
        prefill_tokens_per_s=settings.batch * settings.input_len / statistics.median(prefill_times),
        decode_tokens_per_s=decode_tokens / statistics.median(decode_times),
        peak_memory_bytes=int(peak), prefill_seconds=prefill_times, decode_seconds=decode_times,
        runner=settings.runner if settings.engine == "torch" else "")))


def plot(report: dict[str, Any], path: Path) -> None:
    """Prefill and decode tokens/s per model as grouped bars, annotated with the speed-up vs the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    names = [Path(r["model"]).name or r["model"] for r in results]
    figure, axes = plt.subplots(1, 2, figsize=(4 + 2 * len(results), 4))
    for axis, phase in zip(axes, ("prefill", "decode")):
        values = [r[f"{phase}_tokens_per_s"] for r in results]
        bars = axis.bar(range(len(values)), values, color=["#777777"] + ["#2a7ab9"] * (len(values) - 1))
        axis.set_xticks(range(len(values)), names)
        for bar, r in zip(bars, results):
            axis.annotate(f"{r[f'{phase}_speedup_vs_first']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=9)
        axis.set_title(f"{phase} ({results[0]['engine']})")
        axis.set_ylabel("tokens/s")
        axis.tick_params(axis="x", labelrotation=20)
    settings = report["settings"]
    figure.suptitle(f"batch {settings['batch']}, input {settings['input_len']}, output {settings['output_len']}, "
                    f"median of {settings['repeats']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def worker_main(argv: list[str]) -> None:
    """The worker process: python -m graphprune.bench MODEL SETTINGS_JSON (commands on stdin)."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)

    def reply(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    settings = BenchSettings(**json.loads(argv[2]))
    sys.path[:0] = [path for path in settings.plugin_paths if path]
    for plugin in settings.plugins:  # a plugin engine registers when its module imports
        __import__(plugin)
    serve(argv[1], settings, sys.stdin, reply)


if __name__ == "__main__":  # run the imported module's worker, so that plugins register where it looks
    from graphprune.bench import worker_main as _worker_main

    _worker_main(sys.argv)
