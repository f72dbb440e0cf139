"""Knowledge distillation of a pruned student from its teacher, on one CPU process or many GPUs.

Logit-only forward KL(teacher || student) per token (the paper), optionally with temperature,
top-k teacher logits and a weighted LM loss. Runs as it is in one process, and under
`torchrun --nproc-per-node N` with DDP or FSDP2 (`fully_shard`). Every rank sees the same data
order: step s uses the s-th global batch of a seeded permutation, cut into micro-batches that are
dealt to ranks and accumulation steps, so N processes with the same global batch follow the loss
curve of one. Checkpoints (model, optimizer, scheduler, step, RNG) are written atomically by rank 0
and `resume` continues exactly where they left off.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .spec import DistillSpec

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"


class DistillError(UserError):
    """Distillation cannot run (mismatched vocabularies, not enough data, no checkpoint to resume)."""


@dataclass
class DistillResult:
    steps: int
    tokens: int
    final_loss: float
    eval_loss: float | None
    tokens_per_s: float
    seconds: float
    log: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "final_loss": self.final_loss,
                "eval_loss": self.eval_loss, "tokens_per_s": round(self.tokens_per_s, 1),
                "seconds": round(self.seconds, 2)}


# --- the loss ------------------------------------------------------------------------------------
def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            top_k: int | None = None) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the next-token distributions, times T^2."""
    s = student_logits.float().flatten(0, -2) / temperature
    t = teacher_logits.float().flatten(0, -2) / temperature
    if top_k is not None:
        t, index = t.topk(top_k, dim=-1)          # teacher mass on its top-k, renormalised
        student_log_probs = F.log_softmax(s, dim=-1).gather(-1, index)
    else:
        student_log_probs = F.log_softmax(s, dim=-1)
    teacher_log_probs = F.log_softmax(t, dim=-1)
    kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
    return kl.mean() * temperature**2


def lm_loss(student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student_logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


# --- processes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_world() -> World:
    """One process, or the torchrun group (gloo on CPU, nccl on GPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return World(dist.get_rank(), dist.get_world_size(), device)


def _mean_over_ranks(value: float, world: World) -> float:
    if world.size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return tensor.item() / world.size


# --- data order ----------------------------------------------------------------------------------
class DataOrder:
    """Global sequence order: epoch-wise seeded permutations; step s takes the s-th global batch."""

    def __init__(self, samples: torch.Tensor, spec: DistillSpec, world: World):
        self.samples, self.spec, self.world = samples, spec, world
        self.global_batch = world.size * spec.micro_batch_size * spec.grad_accum
        self._permutations: dict[int, torch.Tensor] = {}

    def _sequence(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.samples))
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.spec.seed * 100_003 + epoch)
            self._permutations[epoch] = torch.randperm(len(self.samples), generator=generator)
        return int(self._permutations[epoch][offset])

    def micro_batch(self, step: int, accumulation: int) -> torch.Tensor:
        """Micro-batch c of the global batch goes to rank c % world, accumulation step c // world."""
        micro = self.spec.micro_batch_size
        chunk = accumulation * self.world.size + self.world.rank
        start = step * self.global_batch + chunk * micro
        return self.samples[[self._sequence(start + i) for i in range(micro)]]


# --- the loop ------------------------------------------------------------------------------------
def total_steps(spec: DistillSpec, world_size: int) -> int:
    if spec.steps is not None:
        return spec.steps
    tokens_per_step = world_size * spec.micro_batch_size * spec.grad_accum * spec.seq_len
    return math.ceil(spec.tokens / tokens_per_step)


def _schedule(spec: DistillSpec, steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < spec.warmup_steps:
            return (step + 1) / spec.warmup_steps
        progress = (step - spec.warmup_steps) / max(1, steps - spec.warmup_steps)
        return spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out


def _wrap(student: nn.Module, spec: DistillSpec, world: World) -> nn.Module:
    if world.size == 1:
        return student
    if spec.distributed == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for module in student.modules():
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        fully_shard(student)
        return student
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(student, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, world: World) -> tuple[dict, dict | None]:
    """Whole (unsharded) model and optimizer state, on CPU, for rank 0 to save."""
    if world.size == 1:
        return model.state_dict(), optimizer.state_dict() if optimizer else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(model, optimizer if optimizer else [], options=options)
    return model_state, optim_state if optimizer else None


def _load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, world: World) -> None:
    if world.size == 1:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))


def _save_checkpoint(path: Path, state: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def distill(teacher: nn.Module, student: nn.Module, train: torch.Tensor, holdout: torch.Tensor, spec: DistillSpec,
            workdir: Path, *, resume: bool = False, until_step: int | None = None, world: World | None = None,
            progress: Callable[[dict[str, Any]], None] = lambda record: None) -> DistillResult:
    """Train `student` (in place) against `teacher`; returns the figures. `until_step` stops early
    with a checkpoint (a planned preemption); `resume` continues from the workdir's checkpoint."""
    world = world or World()
    teacher_vocab = teacher.get_output_embeddings().weight.shape[0]
    student_vocab = student.get_output_embeddings().weight.shape[0]
    if teacher_vocab != student_vocab:
        raise DistillError(f"teacher and student vocabularies differ ({teacher_vocab} vs {student_vocab} tokens): "
                           "distillation compares their next-token distributions token by token")
    steps = total_steps(spec, world.size)
    teacher.eval().requires_grad_(False)
    student.train()
    wrapped = _wrap(student, spec, world)
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(spec, steps))
    order = DataOrder(train, spec, world)
    checkpoint_path = workdir / CHECKPOINT
    start_step, log = 0, []
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    if resume:
        if not checkpoint_path.is_file():
            raise DistillError(f"--resume: no checkpoint at {checkpoint_path}")
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        _load_full_state(wrapped, optimizer, state, world)
        scheduler.load_state_dict(state["scheduler"])
        start_step, log = state["step"], state["log"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if world.main:  # a run killed after its last checkpoint logged steps that will run again: drop them
            (workdir / LOG).write_text("".join(json.dumps(record) + "\n" for record in log))
    def autocast():
        return torch.autocast(world.device.type, dtype=torch.bfloat16) if spec.dtype == "bfloat16" else nullcontext()

    tokens_per_step = order.global_batch * spec.seq_len
    started, timed_tokens = time.perf_counter(), 0
    step = start_step
    for step in range(start_step, steps):
        if until_step is not None and step >= until_step:
            break
        optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for accumulation in range(spec.grad_accum):
            ids = order.micro_batch(step, accumulation).to(world.device)
            with torch.no_grad(), autocast():
                teacher_logits = _logits(teacher, ids)
            sync = nullcontext() if (accumulation == spec.grad_accum - 1 or not hasattr(wrapped, "no_sync")) \
                else wrapped.no_sync()
            with sync, autocast():
                student_logits = _logits(wrapped, ids)
                loss = spec.kd_weight * kd_loss(student_logits, teacher_logits, spec.temperature, spec.top_k)
                if spec.lm_weight:
                    loss = loss + spec.lm_weight * lm_loss(student_logits, ids)
            (loss / spec.grad_accum).backward()
            loss_sum += loss.item()
        if spec.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(wrapped.parameters(), spec.grad_clip)
        optimizer.step()
        scheduler.step()
        timed_tokens += tokens_per_step
        record = {"step": step + 1, "tokens": (step + 1) * tokens_per_step,
                  "loss": _mean_over_ranks(loss_sum / spec.grad_accum, world), "lr": scheduler.get_last_lr()[0],
                  "tokens_per_s": timed_tokens / (time.perf_counter() - started)}
        if spec.eval_every and (step + 1) % spec.eval_every == 0:
            record["eval_loss"] = evaluate_kd(teacher, wrapped, holdout, spec, world)
            student.train()
        log.append(record)
        if world.main:
            with open(workdir / LOG, "a") as f:
                f.write(json.dumps(record) + "\n")
        progress(record)
        last = step + 1 == steps or (until_step is not None and step + 1 >= until_step)
        if (spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0) or last:
            model_state, optim_state = _full_state(wrapped, optimizer, world)
            if world.main:
                _save_checkpoint(checkpoint_path, {
                    "model": model_state, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                    "step": step + 1, "log": log,
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}})
    done = log[-1]["step"] if log else start_step
    seconds = time.perf_counter() - started
    training_speed = timed_tokens / max(seconds, 1e-9)  # the training loop alone, before the final eval
    eval_loss = evaluate_kd(teacher, wrapped, holdout, spec, world)
    return DistillResult(steps=done, tokens=done * tokens_per_step, final_loss=log[-1]["loss"] if log else float("nan"),
                         eval_loss=eval_loss, tokens_per_s=training_speed, seconds=time.perf_counter() - started, log=log)


@torch.no_grad()
def evaluate_kd(teacher: nn.Module, student: nn.Module, holdout: torch.Tensor, spec: DistillSpec, world: World) -> float:
    """KD loss on held-out sequences (each rank its share, averaged)."""
    student.eval()
    micro = spec.micro_batch_size
    batches = holdout[world.rank::world.size].split(micro)[: spec.eval_batches]
    losses = [kd_loss(_logits(student, ids.to(world.device)), _logits(teacher, ids.to(world.device)),
                      spec.temperature, spec.top_k).item() for ids in batches]
    return _mean_over_ranks(sum(losses) / max(len(losses), 1), world)


SCRATCH_PREFIX = ".distill-scratch-"


def distill_in_process(teacher: nn.Module, student: nn.Module, train: torch.Tensor, holdout: torch.Tensor,
                       spec: DistillSpec, console: Any, scratch_in: Path) -> DistillResult:
    """One process, a progress bar (the distill pass, the search). Its checkpoints go to a hidden scratch
    folder inside `scratch_in`, the locked output being built, never the system temp folder: a killed run's
    scratch is found and removed with its output's leftovers."""
    workdir = scratch_in / f"{SCRATCH_PREFIX}{os.getpid()}"
    workdir.mkdir(parents=True, exist_ok=True)
    bar, update = progress_printer(total_steps(spec, 1), console, World())
    try:
        with bar:
            return distill(teacher, student, train, holdout, spec, workdir, progress=update)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def remove_scratch(folder: Path) -> None:
    """Scratch folders of killed runs (call while holding the folder's lock: no live run owns one)."""
    for path in folder.glob(f"{SCRATCH_PREFIX}*"):
        shutil.rmtree(path, ignore_errors=True)


@torch.no_grad()
def heldout_loss(model: nn.Module, sequences: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (`lm_loss`) over all tokens of the held-out sequences."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in sequences.split(batch_size):
        ids = ids.to(device)
        tokens = ids[:, 1:].numel()
        total += lm_loss(_logits(model, ids), ids).item() * tokens
        count += tokens
    return total / count


def split_holdout(samples: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `fraction` of the packed sequences are held out (at least one)."""
    held = max(1, int(len(samples) * fraction))
    if len(samples) - held < 1:
        raise DistillError(f"only {len(samples)} sequences of data: not enough to train and hold some out")
    return samples[:-held], samples[-held:]


# --- jobs: `graphprune distill` and the distill pass ------------------------------------------------
def training_samples(spec: DistillSpec, fallback_data: Any, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """All of the data, tokenized and packed into seq_len sequences; then train / holdout."""
    from .data import load_texts, mix_probes, token_samples

    data = spec.data or fallback_data
    if data is None:
        raise DistillError("distill.data: no training data (and no calibration data to fall back on)")
    texts = load_texts(data)
    total = sum(len(t) for t in texts) // 2 // spec.seq_len + 1  # an upper bound on packed sequences
    samples = token_samples(texts, tokenizer, total, spec.seq_len, packing=True, seed=spec.seed, allow_fewer=True)
    train, holdout = split_holdout(samples, spec.holdout_fraction)
    if spec.probe_fraction:
        train = mix_probes(train, spec.probe_fraction, len(tokenizer), spec.seed, "distill.probe_fraction")
    return train, holdout


def progress_printer(steps: int, console: Any, world: World) -> tuple[Any, Callable[[dict], None]]:
    """A rich progress bar with tokens/s, loss and ETA (rank 0 only)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if not world.main:
        return nullcontext(), lambda record: None
    bar = Progress(TextColumn("distill"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[speed]} tok/s  loss {task.fields[loss]}"), TimeRemainingColumn(),
                   console=console, transient=True)
    task = bar.add_task("distill", total=steps, speed="-", loss="-")

    def update(record: dict) -> None:
        bar.update(task, completed=record["step"], speed=f"{record['tokens_per_s']:.0f}", loss=f"{record['loss']:.4f}")

    return bar, update


def write_student(student: nn.Module, folder: Path, summary: dict[str, Any]) -> None:
    """Replace the model files in `folder` (each file atomically), keeping the rest (report, tokenizer)."""
    from .export.hf import write_hf_checkpoint

    write_hf_checkpoint(student, folder)
    (folder / "distill.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")


def run_distill(spec: Any, *, resume: bool = False, until_step: int | None = None, console: Any = None) -> dict[str, Any]:
    """`graphprune distill`: the student at `distill.student` (default `output`) learns from the teacher."""
    from .data import check_data
    from .outputs import OutputLock, check_output_location

    dspec: DistillSpec = spec.distill
    if dspec is None:
        raise DistillError("the spec has no 'distill' section")
    teacher_path = dspec.teacher or spec.model.path
    student_path = dspec.student or spec.output
    if student_path is None or not (Path(student_path) / "config.json").is_file():
        raise DistillError(f"distill.student: no student model at {student_path} (run `graphprune apply` first, "
                           "or set distill.student)")
    if dspec.data is not None:
        check_data(dspec.data, "distill.data")
    teacher_folder = Path(teacher_path)
    if teacher_folder.exists():  # the student is rewritten in place: never the teacher, the user's original
        check_output_location(student_path, {"the teacher's folder": teacher_folder}, {})
    main_rank = int(os.environ.get("RANK", "0")) == 0
    with OutputLock(Path(student_path).resolve()) if main_rank else nullcontext():  # one distillation per student
        return _run_distill_locked(spec, dspec, teacher_path, student_path, resume, until_step, console)


def _run_distill_locked(spec: Any, dspec: DistillSpec, teacher_path: str, student_path: str, resume: bool,
                        until_step: int | None, console: Any) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from .data import load_tokenizer

    world = setup_world()
    tokenizer = load_tokenizer(dspec.tokenizer or teacher_path)
    train, holdout = training_samples(dspec, spec.calibration.data if spec.calibration else None, tokenizer)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).to(world.device)
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32).to(world.device)
    workdir = Path(student_path).parent / f".{Path(student_path).name}.distill"
    if world.main:
        workdir.mkdir(exist_ok=True)
        if not resume and (workdir / LOG).exists():
            (workdir / LOG).unlink()
    if world.size > 1:
        dist.barrier()
    bar, update = progress_printer(total_steps(dspec, world.size), console, world)
    with bar:
        result = distill(teacher, student, train, holdout, dspec, workdir, resume=resume, until_step=until_step,
                         world=world, progress=update)
    summary = {**result.summary(), "teacher": teacher_path, "student": student_path, "world_size": world.size,
               "train_sequences": len(train), "holdout_sequences": len(holdout), "complete": result.steps == total_steps(dspec, world.size)}
    if summary["complete"]:
        model_state, _ = _full_state(student, None, world)  # a collective under FSDP: every rank takes part
    if world.main and summary["complete"]:
        if world.size > 1:  # a plain copy of the whole student for save_pretrained
            student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
            student.load_state_dict(model_state)
        write_student(student, Path(student_path), {**summary, "log": result.log})
    return summary
