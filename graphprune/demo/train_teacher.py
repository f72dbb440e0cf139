"""Train the demo teacher: a small hybrid Mamba2 + attention NemotronH causal LM.

Data: the demo corpus (``corpus/train.txt.gz``) tokenized with the demo BPE,
packed into a stream (each article preceded by ``<|endoftext|>``) from which
random windows of ``seq_len + 1`` tokens are cut, mixed with synthetic probe
sequences (``probes.py``: MQAR with 4..32 key-value pairs, induction, selective
copying) in a fraction ``--probe-frac`` of the rows.  Text rows are trained on
every token, probe rows only on their scored positions.

Everything is seeded: the batch at step ``s`` depends only on ``(--seed, s)``,
so a resumed run sees exactly the batches an uninterrupted run would.

Checkpoints (model, optimizer, scheduler, step, RNG states, log) are written
atomically to ``<workdir>/ckpt.pt`` every ``--ckpt-minutes``.  ``--resume``
continues from it.  At the very end the script evaluates validation perplexity
(and, for comparison, the add-one unigram perplexity of the same tokens) and
probe accuracies, writes ``<workdir>/final.json``, and saves the model with
``save_pretrained`` plus the tokenizer files into ``--out`` (default
``graphprune/demo/teacher``) through a temporary directory and a rename, so a
half-trained model is never left there.

Usage (one CPU thread)::

    OMP_NUM_THREADS=1 python graphprune/demo/train_teacher.py --steps 5000
    OMP_NUM_THREADS=1 python graphprune/demo/train_teacher.py --steps 5000 --resume
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEMO_DIR = Path(__file__).resolve().parent
if __package__:
    from . import probes as P
    from .prepare_data import read_docs
else:  # run as a script: import siblings by file location
    sys.path.insert(0, str(DEMO_DIR))
    import probes as P  # type: ignore
    from prepare_data import read_docs  # type: ignore

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
MQAR_TRAIN_KV = (4, 8, 16, 32)
EVAL_MQAR_KV = (16, 32)


def teacher_config(vocab_size: int = 4096):
    """The demo teacher's NemotronH configuration (about 3.8M parameters)."""
    from transformers import NemotronHConfig

    hidden = 192
    return NemotronHConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        hybrid_override_pattern="M-M*-M-M-",  # 4 Mamba2, 4 MLP, 1 attention
        tie_word_embeddings=False,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        intermediate_size=4 * hidden,
        mlp_hidden_act="relu2",
        mamba_num_heads=12,
        mamba_head_dim=32,  # mamba inner size 384 = 2 * hidden
        ssm_state_size=32,
        n_groups=2,
        conv_kernel=4,
        chunk_size=64,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
    )


# ----------------------------------------------------------------------------- data


def load_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(DEMO_DIR / "tokenizer.json"))


def token_stream(split: str, tok) -> torch.Tensor:
    docs = read_docs(split)
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.append(P.EOT)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def make_batch(step: int, args, stream: torch.Tensor):
    """Deterministic batch for ``step``: (input_ids, targets), both (B, T)."""
    g = torch.Generator()
    g.manual_seed(args.seed * 1_000_003 + step)
    B, T = args.batch_size, args.seq_len
    ids = torch.empty(B, T, dtype=torch.long)
    tgt = torch.empty(B, T, dtype=torch.long)
    is_probe = torch.rand(B, generator=g) < args.probe_frac
    kinds = torch.randint(0, 3, (B,), generator=g)
    kvs = torch.randint(0, len(args.mqar_kv), (B,), generator=g)
    starts = torch.randint(0, len(stream) - T - 1, (B,), generator=g)
    pseeds = torch.randint(0, 2**31 - 1, (B,), generator=g)
    for b in range(B):
        if is_probe[b]:
            name = P.PROBES[int(kinds[b])]
            kw = {"num_kv": args.mqar_kv[int(kvs[b])]} if name == "mqar" else {}
            pb = P.make_probe(name, 1, T, int(pseeds[b]), **kw)
            ids[b], tgt[b] = pb.input_ids[0], pb.targets[0]
        else:
            w = stream[int(starts[b]) : int(starts[b]) + T + 1]
            ids[b], tgt[b] = w[:-1], w[1:]
    return ids, tgt


# ----------------------------------------------------------------------------- eval


@torch.no_grad()
def eval_ppl(model, stream: torch.Tensor, seq_len: int, max_windows: int | None = None, bs: int = 16):
    """Mean NLL over non-overlapping windows of ``stream``; returns (ppl, n_tokens)."""
    model.eval()
    n_win = (len(stream) - 1) // seq_len
    if max_windows is not None:
        n_win = min(n_win, max_windows)
    x = stream[: n_win * seq_len + 1]
    inp = x[:-1].view(n_win, seq_len)
    tgt = x[1:].view(n_win, seq_len)
    tot, cnt = 0.0, 0
    for i in range(0, n_win, bs):
        logits = model(input_ids=inp[i : i + bs], use_cache=False).logits
        tot += F.cross_entropy(logits.flatten(0, 1).float(), tgt[i : i + bs].flatten(), reduction="sum").item()
        cnt += tgt[i : i + bs].numel()
    model.train()
    return math.exp(tot / cnt), cnt


def unigram_ppl(train: torch.Tensor, valid: torch.Tensor, seq_len: int, vocab: int) -> float:
    """Add-one unigram perplexity on the same target tokens as ``eval_ppl``."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    n_win = (len(valid) - 1) // seq_len
    tgt = valid[1 : n_win * seq_len + 1]
    return math.exp(-logp[tgt].mean().item())


def probe_report(model, seq_len: int, n: int, seed: int) -> dict[str, float]:
    out = {}
    for kv in EVAL_MQAR_KV:
        out[f"mqar_kv{kv}"] = P.evaluate_probes(model, ["mqar"], seq_len, n, seed, num_kv=kv)["mqar"]
    out.update(P.evaluate_probes(model, ["induction", "copy"], seq_len, n, seed))
    return out


# ----------------------------------------------------------------------------- ckpt


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def lr_lambda_factory(warmup: int, total: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def param_groups(model, wd: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in n else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def save_final_model(model, out_dir: Path, summary: dict) -> None:
    out_dir = out_dir.resolve()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(DEMO_DIR / name, tmp / name)
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    old = out_dir.with_name(out_dir.name + ".old")
    if out_dir.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old.exists():
        shutil.rmtree(old)


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the graphprune demo teacher (NemotronH hybrid).")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--probe-frac", type=float, default=0.25)
    ap.add_argument("--mqar-kv", type=int, nargs="+", default=list(MQAR_TRAIN_KV),
                    help="MQAR key-value pair counts drawn uniformly for training rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/demo_teacher_run"))
    ap.add_argument("--out", type=Path, default=DEMO_DIR / "teacher")
    ap.add_argument("--no-save", action="store_true", help="do not write --out (smoke runs)")
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--final-probe-n", type=int, default=256)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init-from", type=Path, default=None,
                    help="start from the model weights of another run's ckpt.pt (a new phase: fresh optimizer "
                         "and schedule, e.g. with a larger --probe-frac); its tokens and time are carried over")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = args.workdir / "ckpt.pt"
    command = " ".join([sys.executable] + sys.argv)

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    from transformers import NemotronHForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    tok = load_tokenizer()
    t0 = time.time()
    train_stream = token_stream("train", tok)
    valid_stream = token_stream("valid", tok)
    print(f"tokens: train {len(train_stream)}, valid {len(valid_stream)} ({time.time() - t0:.1f}s)", flush=True)

    cfg = teacher_config(tok.get_vocab_size())
    model = NemotronHForCausalLM(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params} params, layers {cfg.layers_block_type}", flush=True)

    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_factory(args.warmup, args.steps, args.min_lr_ratio))

    step, tokens_seen, wall_before, history = 0, 0, 0.0, []
    earlier_phases: list[dict] = []  # every run this one continues from, oldest first
    if args.init_from is not None and not (args.resume and ckpt_path.exists()):
        previous = torch.load(args.init_from, map_location="cpu", weights_only=True)
        model.load_state_dict(previous["model"])
        tokens_seen, wall_before = previous["tokens_seen"], previous["wall_time"]
        earlier_phases = previous.get("earlier_phases", []) + [
            {"checkpoint": str(args.init_from), "steps": previous["step"], "tokens": previous["tokens_seen"],
             "command": previous.get("command"), "args": previous["args"]}]
        history = [{**h, "phase": h.get("phase", len(earlier_phases))} for h in previous["history"]]
        print(f"initialised from {args.init_from} (step {previous['step']}, {tokens_seen} tokens)", flush=True)
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        for k in ("batch_size", "seq_len", "seed", "probe_frac"):
            if ck["args"][k] != getattr(args, k):
                raise SystemExit(f"--resume: {k} differs from the checkpoint ({ck['args'][k]})")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if ck["args"]["steps"] != args.steps:  # allow extending/shortening the run
            sched.lr_lambdas[0] = lr_lambda_factory(args.warmup, args.steps, args.min_lr_ratio)
        step, tokens_seen, wall_before = ck["step"], ck["tokens_seen"], ck["wall_time"]
        history = ck["history"]
        earlier_phases = ck.get("earlier_phases", [])
        random.setstate(ck["rng"]["python"])
        torch.set_rng_state(ck["rng"]["torch"])
        print(f"resumed from {ckpt_path} at step {step}", flush=True)
    elif args.resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting fresh", flush=True)

    def checkpoint():
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": step,
                "tokens_seen": tokens_seen,
                "wall_time": wall_before + (time.time() - t_start),
                "history": history,
                "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "command": command,
                "earlier_phases": earlier_phases,
                "config": cfg.to_dict(),
                "rng": {"python": random.getstate(), "torch": torch.get_rng_state()},
            },
            ckpt_path,
        )

    t_start = time.time()
    last_ckpt = time.time()
    t_log, loss_acc, n_acc = time.time(), 0.0, 0
    while step < args.steps:
        ids, tgt = make_batch(step, args, train_stream)
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=P.IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        sched.step()
        step += 1
        tokens_seen += ids.numel()
        loss_acc += loss.item()
        n_acc += 1
        if step % args.log_every == 0 or step == args.steps:
            dt = time.time() - t_log
            rec = {
                "step": step,
                "loss": round(loss_acc / n_acc, 4),
                "lr": sched.get_last_lr()[0],
                "gnorm": round(float(gnorm), 3),
                "steps_per_s": round(n_acc / dt, 3),
                "elapsed_s": round(wall_before + time.time() - t_start, 1),
            }
            print(json.dumps(rec), flush=True)
            history.append(rec)
            t_log, loss_acc, n_acc = time.time(), 0.0, 0
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            ppl, _ = eval_ppl(model, valid_stream, args.seq_len, max_windows=32)
            pr = probe_report(model, max(args.seq_len, 2 + 4 * max(EVAL_MQAR_KV)), 32, seed=12345)
            rec = {"step": step, "val_ppl_32win": round(ppl, 3), **{k: round(v, 4) for k, v in pr.items()}}
            print("eval", json.dumps(rec), flush=True)
            history.append(rec)
            t_log = time.time()
        if time.time() - last_ckpt > args.ckpt_minutes * 60 and step < args.steps:
            checkpoint()
            last_ckpt = time.time()
            print(f"checkpoint at step {step}", flush=True)
    train_wall = wall_before + (time.time() - t_start)
    checkpoint()

    print("final evaluation ...", flush=True)
    t_eval = time.time()
    val_ppl, val_tokens = eval_ppl(model, valid_stream, args.seq_len)
    uni_ppl = unigram_ppl(train_stream, valid_stream, args.seq_len, cfg.vocab_size)
    probes = probe_report(model, args.seq_len, args.final_probe_n, seed=20260101)
    summary = {
        "command": command,
        "model_class": "NemotronHForCausalLM",
        "n_params": n_params,
        "layers_block_type": cfg.layers_block_type,
        "steps": step,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": tokens_seen,
        "probe_fraction": args.probe_frac,
        "train_tokens_in_corpus": len(train_stream),
        "train_wall_time_s": round(train_wall, 1),
        "eval_wall_time_s": round(time.time() - t_eval, 1),
        "threads": args.threads,
        "val_tokens": val_tokens,
        "val_perplexity": round(val_ppl, 3),
        "unigram_val_perplexity": round(uni_ppl, 3),
        "probe_eval": {"seq_len": args.seq_len, "n": args.final_probe_n, "seed": 20260101},
        "probe_accuracy": {k: round(v, 4) for k, v in probes.items()},
        "final_train_loss": history[-1]["loss"] if history else None,
        "earlier_phases": earlier_phases,
    }
    (args.workdir / "final.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)
    if not args.no_save:
        save_final_model(model, args.out, summary)
        print(f"saved model to {args.out}", flush=True)


if __name__ == "__main__":
    main()
