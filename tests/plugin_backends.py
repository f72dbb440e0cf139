"""A user plugin: a toy export format and a toy bench engine, registered from a module named in `plugins`."""

import json
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from graphprune.bench import _Timed, register_engine
from graphprune.export import register_format


class SummaryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    note: str = ""


@register_format("summary", options=SummaryOptions)
def write_summary(model, folder: Path, tokenizer_from, options: SummaryOptions) -> dict:
    """A JSON file with the model's parameter count (a stand-in for a runtime's format)."""
    params = sum(p.numel() for p in model.parameters())
    (folder / "summary.json").write_text(json.dumps({"params": params, "note": options.note}))
    return {"params": params}


class SleepOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seconds_per_billion: float = 1.0


@register_engine("sleep", options=SleepOptions)
def sleep_engine(path: str, settings, options: SleepOptions) -> _Timed:
    """Sleeps in proportion to the model's parameters: a stand-in for a runtime (no torch in the timing)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    seconds = options.seconds_per_billion * sum(p.numel() for p in model.parameters()) / 1e9
    return _Timed(prefill=lambda: time.sleep(seconds), decode=lambda state: time.sleep(seconds), model=model)
