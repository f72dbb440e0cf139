"""Failures are loud and say where: unknown ops on channel axes, untraceable modules, bad sources."""

import json

import pytest
import torch
from torch import nn

from graphprune import analyze
from graphprune.analysis import AnalysisError
from graphprune.trace import LoadError, TraceError


class Reverser(nn.Module):
    def forward(self, x):
        return torch.flip(x, dims=[-1])  # reorders channels: no rule can slice through this


class FlipModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.mix = Reverser()
        self.head = nn.Linear(8, 32)

    def forward(self, ids):
        return self.head(self.mix(self.embed(ids)))


def test_op_without_rule_on_a_channel_axis_names_op_module_and_axis():
    with pytest.raises(AnalysisError) as info:
        analyze(FlipModel())
    message = str(info.value)
    assert "aten.flip" in message
    assert "mix (Reverser)" in message
    assert "embed.weight[1]" in message and "dim 2" in message


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            return x * 2
        return x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.branchy = DataDependent()

    def forward(self, ids):
        return self.branchy(self.embed(ids))


def test_trace_failure_names_the_module():
    with pytest.raises(TraceError) as info:
        analyze(Untraceable())
    assert "module 'branchy' (DataDependent.forward" in str(info.value)


def test_missing_path_and_bad_config(tmp_path):
    with pytest.raises(LoadError, match="neither a Hugging Face model folder nor a config"):
        analyze(str(tmp_path / "nope.json"))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(LoadError, match="model_type"):
        analyze(str(tmp_path / "config.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoadError, match="without a config.json"):
        analyze(str(empty))
