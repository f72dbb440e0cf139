"""lm-evaluation-harness runs a graphprune model on the local task files and scores what we compute."""

import math
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from checkpoints import DEMO, nemotron_h_config, write_checkpoint
from graphprune.data import load_texts
from graphprune.lm_eval_tasks import TASK, write_tasks
from graphprune.spec import DataSpec


def own_word_perplexity(model, tokenizer, docs):
    """exp(total NLL / total words), each document scored after the prefix token (it fits one window)."""
    nll, words = 0.0, 0
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        inputs = torch.tensor([[tokenizer.bos_token_id] + ids[:-1]])
        with torch.no_grad():
            logp = model(input_ids=inputs, use_cache=False).logits.float().log_softmax(-1)[0]
        nll -= logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
        words += len(re.split(r"\s+", doc))
    return math.exp(nll / words)


def test_harness_scores_held_out_text_like_our_own_computation(tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = write_checkpoint(nemotron_h_config(), tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    docs = [d.strip() for d in load_texts(DataSpec(path=str(DEMO / "corpus" / "valid.txt.gz")))
            if 20 < len(tokenizer(d.strip())["input_ids"]) < 200][:6]
    text = tmp_path / "docs.txt"
    text.write_text("\n\n".join(docs) + "\n")
    written = write_tasks(tmp_path / "tasks", text)
    assert written["documents"] == "6"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, max_length=256),
                                      tasks=[TASK], task_manager=TaskManager(include_path=written["folder"]))
    scores = results["results"][TASK]
    assert scores["word_perplexity,none"] == pytest.approx(own_word_perplexity(model, tokenizer, docs), rel=1e-3)
    assert scores["bits_per_byte,none"] > 0
