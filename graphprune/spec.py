"""The pruning spec: a JSON program, validated whole before anything touches weights.

Field names follow NVIDIA Model Optimizer where it has them (`hidden_size`, `ffn_hidden_size`,
`mamba_num_heads`, `mamba_head_dim`, `num_attention_heads`, `num_layers`, `params`).
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from .errors import UserError


class SpecError(UserError):
    """The spec is invalid; the message names the JSON path and what would be valid."""


def _exactly_one(model: BaseModel, first: str, second: str, what: str) -> BaseModel:
    if (getattr(model, first) is None) == (getattr(model, second) is None):
        raise ValueError(f"give exactly one of {what}")
    return model


def _usable_path(value: str) -> str:
    """A path the operating system can take: refused here, the OS would fail later with a bare OSError."""
    if "\x00" in value:
        raise ValueError("a path cannot contain a NUL character")
    if len(value.encode()) > 4096 or any(len(part.encode()) > 255 for part in Path(value).parts):
        raise ValueError(f"path too long ({len(value):,} characters; the system allows 4096, and 255 per name)")
    return value


PathText = Annotated[str, AfterValidator(_usable_path)]
"""A local path or hub id."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class ModelSpec(_Strict):
    path: PathText
    """Hugging Face model folder, config.json (planning on meta), or hub id (online)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype to load the weights in."""
    device: Literal["cpu", "cuda", "meta"] = "cpu"
    """Where to run: `meta` plans only (no weights, no data)."""
    trust_remote_code: bool = False
    """Allow custom model code shipped with the checkpoint."""


class DataSpec(_Strict):
    path: PathText | None = None
    """Local file: .txt (one document per blank-line separated block), .jsonl/.json, .parquet, .txt.gz."""
    dataset: str | None = None
    """A `datasets` hub id, for users who are online (instead of `path`)."""
    split: str = "train"
    """Split of a hub dataset."""
    text_field: str = "text"
    """Field holding the text in JSONL, parquet and hub datasets."""

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        return _exactly_one(self, "path", "dataset", "'path' (a local file) or 'dataset' (a hub id)")


class CalibrationSpec(_Strict):
    data: DataSpec
    """Text used to measure activations."""
    tokenizer: PathText | None = None
    """Tokenizer folder or hub id; default: the model's own."""
    num_samples: int = Field(1024, ge=1)
    """Number of sequences (the paper: 1024)."""
    seq_len: int = Field(512, ge=2)
    """Tokens per sequence (the paper: 8192)."""
    batch_size: int = Field(1, ge=1)
    """Sequences per forward pass (the paper found 1 slightly better for scoring)."""
    packing: bool = True
    """Concatenate documents into full sequences (no padding), as the paper recommends."""
    seed: int = 0
    """Seed for sample order."""
    probe_fraction: float = Field(0.0, ge=0, lt=1)
    """Share of calibration sequences replaced by seeded probe sequences (MQAR, induction, selective copy, in
    the demo tokenizer's id layout), so that activation scores also see in-context recall."""


ChannelMethod = Literal["activation", "taylor", "removal", "magnitude", "random"]


class ImportanceSpec(_Strict):
    """Per axis: `activation` (the paper's: mean |activation| per channel), `taylor` (Fisher information of a
    mask on the unit, from one forward and backward of the calibration set), `removal` (KL of the logits with the
    unit masked, one forward per unit: for heads), `magnitude` (weight norm) or `random`."""

    hidden: ChannelMethod = "activation"
    """Embedding channels: outputs of every pre-norm in the layers, summed over layers."""
    ffn: ChannelMethod = "activation"
    """FFN neurons: output of the first projection."""
    mamba: ChannelMethod = "activation"
    """Mamba heads and head_dim: the x slice of in_proj (Algorithm 1)."""
    attention: ChannelMethod = "activation"
    """Query heads, ranked within their KV group: the input of the output projection."""
    depth: Literal["kl_removal", "cosine", "random"] = "kl_removal"
    """Layers: KL divergence of the logits with the layer removed (paper) or 1 - cos(in, out) (Model Optimizer)."""
    depth_samples: int = Field(4, ge=1)
    """Calibration sequences used for depth scoring (the paper: 256; on SmolLM2 one sequence already beats the peers'
    depth pruning, and each costs one forward per layer)."""
    removal_samples: int = Field(1, ge=1)
    """Calibration sequences used by the `removal` score (one forward per unit and sequence)."""
    mamba_nested: bool = True
    """Algorithm 1: choose head_dim channels first, then rank heads on the kept channels only."""
    group_aware: bool = True
    """Rank Mamba heads within their B/C group. false: rank globally and refill groups in rank order (naive baseline)."""
    split_candidates: int = Field(6, ge=1)
    """With targets.params: how many ways to spend the budget (hidden vs FFN vs Mamba heads, each at 50-100%,
    within 85-100% of the budget, the one-common-factor split among them) are built and compared by LM loss on
    `split_samples` calibration sequences; the lowest wins. 1: the common factor alone, no comparison."""
    split_samples: int = Field(4, ge=1)
    """Calibration sequences (the last ones) on which the budget splits are compared."""


class TargetsSpec(_Strict):
    hidden_size: int | None = Field(None, ge=1)
    ffn_hidden_size: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)
    mamba_num_heads: int | None = Field(None, ge=1)
    mamba_head_dim: int | None = Field(None, ge=1)
    num_layers: int | None = Field(None, ge=1)
    params: int | None = Field(None, ge=1)
    """A parameter budget: the hidden size, FFN and Mamba heads not given explicitly shrink by one common factor
    (each in its constraint's steps, in sizes the family's config accepts) until the model fits."""
    groups: dict[str, int] = Field(default_factory=dict)
    """Per-group sizes by group name (see `graphprune inspect`); generic models only."""
    identity: bool = False
    """Prune nothing, on purpose: write an unpruned copy through the whole pipeline (a correctness check).
    Without it, targets that leave the model unchanged are an error."""

    @model_validator(mode="after")
    def _budget_without_depth(self) -> TargetsSpec:
        if self.params is not None and self.num_layers is not None:
            raise ValueError("'params' is a width budget: give num_layers without it (or use `graphprune search`, "
                             "which trades depth against width)")
        given = [name for name, value in self if name != "identity" and value not in (None, {})]
        if self.identity and given:
            raise ValueError(f"'identity' prunes nothing: remove {', '.join(given)} or 'identity'")
        return self


class PassSpec(_Strict):
    name: str
    """A registered pass (see README: built-ins, `plugins`, entry points `graphprune.passes`)."""
    args: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the pass."""


class DistillSpec(_Strict):
    teacher: PathText | None = None
    """Teacher model folder; default: `model.path` (the original model)."""
    student: PathText | None = None
    """Student model folder; default: `output` (the pruned model)."""
    data: DataSpec | None = None
    """Training text; default: the calibration data."""
    tokenizer: PathText | None = None
    """Default: the teacher's."""
    holdout_fraction: float = Field(0.05, gt=0, lt=1)
    """Share of the packed sequences kept out of training for eval_loss."""
    probe_fraction: float = Field(0.0, ge=0, lt=1)
    """Share of training sequences replaced by seeded probe sequences (MQAR, induction, selective copy,
    in the demo tokenizer's id layout), so that KD also passes on in-context recall; the holdout stays text."""
    seq_len: int = Field(512, ge=2)
    micro_batch_size: int = Field(1, ge=1)
    """Sequences per process per forward."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step (global batch = processes x micro_batch_size x grad_accum)."""
    steps: int | None = Field(None, ge=1)
    tokens: int | None = Field(None, ge=1)
    """Token budget instead of steps (rounded up to whole steps)."""
    lr: float = Field(1e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine decay down to lr * min_lr_ratio."""
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    temperature: float = Field(1.0, gt=0)
    """Softmax temperature of the logit KL (the paper: 1)."""
    top_k: int | None = Field(None, ge=1)
    """Distil only the teacher's top-k logits per token (renormalised)."""
    kd_weight: float = Field(1.0, ge=0)
    lm_weight: float = Field(0.0, ge=0)
    """Weight of the next-token cross-entropy (the paper: 0, logit-only KD)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """float32, or bfloat16 autocast."""
    grad_clip: float | None = Field(1.0, gt=0)
    eval_every: int | None = Field(None, ge=1)
    eval_batches: int = Field(4, ge=1)
    checkpoint_every: int | None = Field(None, ge=1)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: DistributedDataParallel or FSDP2 (fully_shard)."""
    seed: int = 0

    @model_validator(mode="after")
    def _budget(self) -> DistillSpec:
        return _exactly_one(self, "steps", "tokens", "'steps' or 'tokens'")


class ReconstructSpec(_Strict):
    """Refit the kept input columns of every projection that reads a pruned unit (o_proj, down_proj, a Mamba
    out_proj) by ridge least squares, so its output matches the original's on the calibration data."""

    ridge: float = Field(1e-3, ge=0)
    """Ridge damping, relative to the mean diagonal of the kept inputs' Gram matrix."""
    samples: int | None = Field(None, ge=1)
    """Calibration sequences for the input statistics (default: all of them)."""
    max_gram_bytes: int = Field(4 * 2**30, ge=1)
    """Most bytes of float64 Gram matrices held at once. The readers are refitted in chunks that fit, one
    forward pass over the samples per chunk (Nemotron-H 8B's 24 down_proj alone would need 89 GB at once)."""


def _registered(registry: str) -> Any:
    """JSON Schema extra: the built-in names of `graphprune.export.FORMATS` or `graphprune.bench.ENGINES`
    (spec validation itself checks names, plugins' too, when the pipeline is checked)."""
    def extra(schema: dict[str, Any]) -> None:
        import importlib

        module, name = registry.rsplit(".", 1)
        schema["items"]["examples"] = getattr(importlib.import_module(module), name).names(built_in=True)
    return extra


class ExportSpec(_Strict):
    formats: list[str] = Field(default_factory=lambda: ["onnx", "trtllm"], min_length=1,
                               json_schema_extra=_registered("graphprune.export.FORMATS"))
    """Back ends written into `<output>/export/<format>` after everything else (`graphprune export`):
    registered formats (built in: hf, onnx, trtllm; plugins add their own)."""
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per format, its options (trtllm: input_len, output_len, num_requests of the benchmark dataset)."""

    @model_validator(mode="before")
    @classmethod
    def _trtllm_keys_at_the_top(cls, data: Any) -> Any:
        """Specs written before the registry put trtllm's options beside `formats`: still accepted."""
        if isinstance(data, dict) and {"input_len", "output_len", "num_requests"} & set(data):
            data = dict(data)
            legacy = {k: data.pop(k) for k in ("input_len", "output_len", "num_requests") if k in data}
            formats = data.get("formats", ["onnx", "trtllm"])
            if isinstance(formats, list) and "trtllm" in formats:  # else unused, as they always were
                options = dict(data.get("options") or {})
                options["trtllm"] = {**legacy, **(options.get("trtllm") or {})}
                data["options"] = options
        return data


class BenchSpec(_Strict):
    engines: list[str] = Field(default_factory=lambda: ["torch"], min_length=1,
                               json_schema_extra=_registered("graphprune.bench.ENGINES"))
    """Engines that measure the original against the pruned model (`graphprune bench`): registered engines
    (built in: torch, onnxruntime, trtllm; plugins add their own)."""
    options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per engine, its options (none for the built-ins)."""
    batch: int = Field(1, ge=1)
    input_len: int = Field(128, ge=1)
    output_len: int = Field(32, ge=1)
    repeats: int = Field(3, ge=1)
    """Timed runs per model (after one warm-up); the median is reported."""
    threads: int | None = Field(None, ge=1)
    """CPU threads per model (default: torch's default)."""


class AxisSpace(_Strict):
    values: list[int] | None = None
    """Exactly these sizes; or a range:"""
    min: int | None = Field(None, ge=1)
    max: int | None = Field(None, ge=1)
    step: int | None = Field(None, ge=1)
    """Range step (default: the axis' constraint unit, e.g. n_groups for Mamba heads)."""

    @model_validator(mode="after")
    def _values_or_range(self) -> AxisSpace:
        if self.values is not None and (self.min, self.max, self.step) != (None, None, None):
            raise ValueError("give 'values' or a range ('min', 'max', 'step'), not both")
        if self.values is not None and (not self.values or min(self.values) < 1):
            raise ValueError("'values' must be a non-empty list of positive sizes")
        return self


SearchAxis = Literal["hidden_size", "ffn_hidden_size", "mamba_num_heads", "mamba_head_dim", "num_attention_heads",
                     "num_layers"]
SEARCH_AXES: tuple[str, ...] = get_args(SearchAxis)


class SearchSpec(_Strict):
    space: dict[SearchAxis, AxisSpace] = Field(default_factory=dict)
    """Sizes to try per axis; an axis not given uses defaults: hidden, FFN and Mamba heads at 50-100% and
    layers at 75-100% of the original, in constraint-respecting steps; head_dim and attention heads fixed."""
    max_candidates: int = Field(100, ge=1)
    """At most this many candidates, spread evenly over parameter counts."""
    top_k: int = Field(5, ge=1)
    """Candidates with the lowest zero-shot loss that get the short distillation (the `distill` section)."""
    min_budget_fraction: float = Field(0.9, gt=0, le=1)
    """Candidates must use at least this share of the budget (smaller ones waste it)."""
    memory_bytes: int | None = Field(None, ge=1)
    """A memory budget instead of targets.params: weights plus KV cache and SSM state at memory_batch x memory_seq_len."""
    memory_batch: int = Field(1, ge=1)
    memory_seq_len: int = Field(4096, ge=1)
    eval_sequences: int = Field(16, ge=1)
    """Held-out sequences (of distill.seq_len tokens) for the zero-shot and post-KD losses."""
    loss_tolerance: float = Field(0.005, ge=0)
    """Losses within this relative margin tie; throughput breaks the tie (the paper's rule)."""
    bench: BenchSpec = Field(default_factory=lambda: BenchSpec(input_len=64, output_len=16))
    """How the top K are timed (tokens/s = generated tokens / (prefill + decode) time); first engine used."""
    final_distill_steps: int | None = Field(None, ge=1)
    """Optionally distil the winner this many steps more (else only the short KD) into <output>/winner."""


class Spec(_Strict):
    model: ModelSpec
    calibration: CalibrationSpec | None = None
    """Needed for activation and KL scores (not for --dry-run)."""
    importance: ImportanceSpec = Field(default_factory=ImportanceSpec)
    targets: TargetsSpec = Field(default_factory=TargetsSpec)
    passes: list[PassSpec] | None = None
    """Explicit pipeline; default: the Minitron-SSM recipe."""
    plugins: list[str] = Field(default_factory=list)
    """Python modules to import first; they register passes. A module beside the spec file imports too. Plugins
    are arbitrary code, run with your rights: list only modules you trust."""
    output: PathText | None = Field(None, min_length=1)
    """Directory for the pruned model and report.json (written atomically; relative to the spec file). It may not
    be, contain or lie inside the model's folder, nor be or contain the spec's or the data's folder."""
    reconstruct: ReconstructSpec | None = Field(default_factory=ReconstructSpec)
    """Least-squares refit of the weights that read pruned units, after `prune` (the `reconstruct` pass). On by
    default when the spec has calibration data (SmolLM2 with 25% pruned, taylor scores: perplexity 281 -> 28);
    `null` turns it off (e.g. to compare a cut with masking the original)."""
    distill: DistillSpec | None = None
    """Knowledge distillation of the pruned student from the teacher (`graphprune distill`, or a stage of apply)."""
    export: ExportSpec | None = None
    """Deployment formats written at the end of apply."""
    bench: BenchSpec | None = None
    """Speed of the original against the pruned model, measured at the end of apply."""
    search: SearchSpec | None = None
    """Architecture search under a budget (`graphprune search`): targets.params or search.memory_bytes."""
    _source_dir: Path | None = PrivateAttr(None)

    @property
    def source_dir(self) -> Path | None:
        """The folder of the spec file this spec was read from (None for a spec built in code)."""
        return self._source_dir


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec; relative paths in it are relative to the spec file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"spec file {path} does not exist") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text; a spec is a JSON file in UTF-8") from None
    except json.JSONDecodeError as err:
        raise SpecError(f"{path}: not valid JSON: {err}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a spec") from None
    except OSError as err:  # a folder, no permission, a name too long
        raise SpecError(f"{path}: cannot be read: {err.strerror or err}") from None
    spec = resolve_paths(parse_spec(data, source=str(path)), path.parent)
    spec._source_dir = path.parent.resolve()
    return spec


def parse_spec(data: Any, source: str = "spec") -> Spec:
    try:
        return Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source} is invalid:\n" + "\n".join(_describe(e) for e in err.errors())) from None


def _describe(error: dict) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown field"
        parent = _model_at(error["loc"][:-1])
        if parent is not None:
            message += f"; valid fields here: {', '.join(parent.model_fields)}"
    elif error["type"] == "literal_error":
        message = f"{message} (got {quoted(error.get('input'))})"
    return f"  at {shortened(where)}: {shortened(message, 300)}"


QUOTE = reprlib.Repr()  # quotes user values in errors, bounded in length and depth (a 5,000-deep list too)
QUOTE.maxlevel, QUOTE.maxstring, QUOTE.maxother, QUOTE.maxlist, QUOTE.maxdict = 3, 100, 100, 5, 5


def quoted(value: Any) -> str:
    """A user's value in an error message: bounded, with the length of a cut string."""
    text = QUOTE.repr(value)
    return f"{text} ({len(value):,} characters)" if isinstance(value, str) and len(value) > QUOTE.maxstring else text


def shortened(text: str, limit: int = 100) -> str:
    """Quoted user input is cut, so that a huge value cannot flood the terminal."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = Spec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        annotation = field.annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return None
        model = candidates[0]
    return model


def resolve_paths(spec: Spec, base: Path) -> Spec:
    """Make local paths absolute against `base`; hub ids (no such local file) stay as they are."""

    def local(value: str | None) -> str | None:
        if value is None:
            return None
        candidate = base / Path(value).expanduser()
        looks_local = value.startswith((".", "/", "~")) or candidate.exists()
        return str(candidate.resolve()) if looks_local else value

    update: dict[str, Any] = {"model": spec.model.model_copy(update={"path": local(spec.model.path)})}
    if spec.calibration is not None:
        data = spec.calibration.data.model_copy(update={"path": local(spec.calibration.data.path)})
        update["calibration"] = spec.calibration.model_copy(
            update={"data": data, "tokenizer": local(spec.calibration.tokenizer)})
    if spec.output is not None:
        update["output"] = str((base / Path(spec.output).expanduser()).resolve()) if spec.output.strip() else spec.output
    if spec.distill is not None:
        distill = spec.distill
        data = distill.data.model_copy(update={"path": local(distill.data.path)}) if distill.data else None
        update["distill"] = distill.model_copy(update={"teacher": local(distill.teacher), "student": local(distill.student),
                                                       "tokenizer": local(distill.tokenizer), "data": data})
    return spec.model_copy(update=update)


def json_schema() -> dict:
    return Spec.model_json_schema()
