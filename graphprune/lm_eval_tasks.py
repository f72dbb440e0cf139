"""Task files for lm-evaluation-harness on local data (it ships no data and runs offline this way).

`write_tasks(folder)` writes ``graphprune_heldout.yaml`` (rolling log-likelihood of held-out
documents: word and byte perplexity, bits per byte) and its ``heldout.jsonl``; then

    lm_eval --model hf --model_args pretrained=MODEL_DIR --include_path FOLDER --tasks graphprune_heldout

evaluates any graphprune output (an ordinary Hugging Face folder) as it evaluates other models.
The probes (MQAR, induction, copy) are defined on token ids, not text, so they stay in `graphprune eval`.
"""

from __future__ import annotations

import json
from pathlib import Path

TASK = "graphprune_heldout"
TASK_TEMPLATE = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
metadata:
  version: 1.0
"""


def write_tasks(folder: Path, data: str | Path | None = None, max_docs: int = 500) -> dict[str, str]:
    """The task YAML and its JSONL (the first `max_docs` documents of `data`; default: the demo's validation split)."""
    from .data import load_texts
    from .evaluate import DEFAULT_DATA
    from .spec import DataSpec

    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    docs = [d.strip() for d in load_texts(DataSpec(path=str(data or DEFAULT_DATA))) if d.strip()][:max_docs]
    if not docs:
        raise ValueError(f"--data: no documents in {data or DEFAULT_DATA}")
    jsonl = folder / "heldout.jsonl"
    jsonl.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    # an absolute path: lm-eval resolves data_files against its working directory
    (folder / f"{TASK}.yaml").write_text(TASK_TEMPLATE.format(task=TASK, data=json.dumps(str(jsonl))))
    return {"task": TASK, "folder": str(folder), "documents": str(len(docs))}
