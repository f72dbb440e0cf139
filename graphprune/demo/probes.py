"""Seeded synthetic probes of sequence-modelling ability for causal LMs.

Three probes, each a generator ``make_<name>(n, seq_len, seed, ...) -> ProbeBatch``:

* ``mqar``: multi-query associative recall (Zoology, Arora et al. 2023).  The
  sequence is ``<|mqar|> k1 v1 k2 v2 ... kN vN <|query|> q1 a1 q2 a2 ...``; every
  query ``q`` is one of the N keys (drawn with replacement) and the model must
  output its value ``a`` right after it.  Scored: the answer positions.
* ``induction``: ``<|induct|> x1..xL x1..xL`` with random tokens; scored: every
  token of the second copy except its first (it is predictable from the
  previous token only via the first copy).
* ``copy``: selective copying (Gu & Dao 2023): ``<|copy|>`` then a region of
  ``<|noise|>`` tokens with K content tokens at random positions, then
  ``<|recall|>`` then the K content tokens in order.  Scored: the K outputs.

Token ids.  Task markers are dedicated special tokens of the demo tokenizer
(ids 0..15, see ``prepare_data.SPECIAL_TOKENS``).  Content tokens are ordinary
BPE ids taken from fixed, disjoint ranges (they never overlap each other nor
the special tokens), so the probes work with any vocabulary of >= 4096 ids:

==========  ==============  ============================
probe       role            id range
==========  ==============  ============================
mqar        keys            [1024, 1280)   (256 ids)
mqar        values          [1280, 1536)   (256 ids)
induction   random tokens   [2048, 3072)   (1024 ids)
copy        content tokens  [3072, 3328)   (256 ids)
==========  ==============  ============================

Layout of a ``ProbeBatch``: ``input_ids`` (n, seq_len) int64, and ``targets``
(n, seq_len) int64 aligned with the *logits*: ``targets[b, t]`` is the token the
model should predict from position ``t`` (i.e. ``input_ids[b, t+1]``) where the
position is scored, and ``-100`` elsewhere.  ``mask = targets != -100``.
Unused tail positions (when the layout does not fill ``seq_len``) hold
``<|endoftext|>`` (id 0) and are never scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
EOT, MQAR, INDUCT, COPY, QUERY, RECALL, NOISE, SEP = range(8)

MQAR_KEYS = (1024, 1280)
MQAR_VALUES = (1280, 1536)
INDUCTION_TOKENS = (2048, 3072)
COPY_TOKENS = (3072, 3328)

PROBES = ("mqar", "induction", "copy")


@dataclass
class ProbeBatch:
    input_ids: torch.Tensor  # (n, seq_len) int64
    targets: torch.Tensor  # (n, seq_len) int64, IGNORE where not scored

    @property
    def mask(self) -> torch.Tensor:
        return self.targets != IGNORE


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _rand_range(lo_hi: tuple[int, int], shape, g: torch.Generator) -> torch.Tensor:
    lo, hi = lo_hi
    return torch.randint(lo, hi, shape, generator=g)


def default_num_kv(seq_len: int) -> int:
    """Number of key-value pairs used by default for MQAR at ``seq_len``."""
    return max(2, min(64, seq_len // 8))


def make_mqar(n: int, seq_len: int, seed: int, num_kv: int | None = None) -> ProbeBatch:
    num_kv = default_num_kv(seq_len) if num_kv is None else num_kv
    nk = MQAR_KEYS[1] - MQAR_KEYS[0]
    if num_kv > nk:
        raise ValueError(f"num_kv={num_kv} exceeds the {nk} available keys")
    num_q = (seq_len - 2 - 2 * num_kv) // 2
    if num_q < 1:
        raise ValueError(f"seq_len={seq_len} too short for num_kv={num_kv}")
    g = _gen(seed)
    ids = torch.full((n, seq_len), EOT, dtype=torch.long)
    tgt = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    ids[:, 0] = MQAR
    q0 = 2 + 2 * num_kv  # first query position
    ids[:, q0 - 1] = QUERY
    for b in range(n):
        keys = torch.randperm(nk, generator=g)[:num_kv] + MQAR_KEYS[0]
        vals = _rand_range(MQAR_VALUES, (num_kv,), g)
        ids[b, 1 : 1 + 2 * num_kv : 2] = keys
        ids[b, 2 : 2 + 2 * num_kv : 2] = vals
        pick = torch.randint(0, num_kv, (num_q,), generator=g)
        qpos = q0 + 2 * torch.arange(num_q)
        ids[b, qpos] = keys[pick]
        ids[b, qpos + 1] = vals[pick]
        tgt[b, qpos] = vals[pick]
    return ProbeBatch(ids, tgt)


def make_induction(n: int, seq_len: int, seed: int) -> ProbeBatch:
    half = (seq_len - 1) // 2
    g = _gen(seed)
    ids = torch.full((n, seq_len), EOT, dtype=torch.long)
    tgt = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    ids[:, 0] = INDUCT
    x = _rand_range(INDUCTION_TOKENS, (n, half), g)
    ids[:, 1 : 1 + half] = x
    ids[:, 1 + half : 1 + 2 * half] = x
    # position p = 1 + half + j holds x[j]; it must predict x[j+1], j = 0..half-2
    start = 1 + half
    tgt[:, start : start + half - 1] = x[:, 1:]
    return ProbeBatch(ids, tgt)


def make_copy(n: int, seq_len: int, seed: int, num_tokens: int | None = None) -> ProbeBatch:
    k = num_tokens if num_tokens is not None else max(2, min(16, seq_len // 16))
    region = seq_len - 2 - k
    if region < k:
        raise ValueError(f"seq_len={seq_len} too short to copy {k} tokens")
    g = _gen(seed)
    ids = torch.full((n, seq_len), NOISE, dtype=torch.long)
    tgt = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    ids[:, 0] = COPY
    ids[:, 1 + region] = RECALL
    for b in range(n):
        pos = torch.sort(torch.randperm(region, generator=g)[:k]).values + 1
        tok = _rand_range(COPY_TOKENS, (k,), g)
        ids[b, pos] = tok
        out0 = 2 + region
        ids[b, out0 : out0 + k] = tok
        tgt[b, out0 - 1 : out0 - 1 + k] = tok
    return ProbeBatch(ids, tgt)


GENERATORS = {"mqar": make_mqar, "induction": make_induction, "copy": make_copy}


def make_probe(name: str, n: int, seq_len: int, seed: int, **kw) -> ProbeBatch:
    try:
        fn = GENERATORS[name]
    except KeyError:
        raise ValueError(f"unknown probe {name!r}; choose from {sorted(GENERATORS)}") from None
    return fn(n, seq_len, seed, **kw)


def probe_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of scored positions where ``argmax(logits)`` equals the target."""
    mask = targets != IGNORE
    if not mask.any():
        return float("nan")
    pred = logits.argmax(dim=-1)
    return (pred[mask] == targets[mask]).float().mean().item()


@torch.no_grad()
def evaluate_probes(
    model,
    names=PROBES,
    seq_len: int = 256,
    n: int = 64,
    seed: int = 0,
    batch_size: int = 16,
    **kw,
) -> dict[str, float]:
    """Accuracy of a transformers causal LM on each probe in ``names``.

    ``n`` sequences of ``seq_len`` tokens per probe, generated with ``seed``
    (every probe uses ``seed`` directly, so results do not depend on the order
    of ``names``).
    Extra keyword arguments go to the generators (e.g. ``num_kv`` for mqar).
    """
    if isinstance(names, str):
        names = [names]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, float] = {}
    try:
        for name in names:
            gen_kw = {k: v for k, v in kw.items() if k in _KW[name]}
            pb = make_probe(name, n, seq_len, seed, **gen_kw)
            correct = total = 0
            for i in range(0, n, batch_size):
                ids = pb.input_ids[i : i + batch_size].to(device)
                tgt = pb.targets[i : i + batch_size].to(device)
                logits = model(input_ids=ids, use_cache=False).logits
                mask = tgt != IGNORE
                correct += (logits.argmax(-1)[mask] == tgt[mask]).sum().item()
                total += mask.sum().item()
            out[name] = correct / max(total, 1)
    finally:
        model.train(was_training)
    return out


_KW = {"mqar": {"num_kv"}, "induction": set(), "copy": {"num_tokens"}}
