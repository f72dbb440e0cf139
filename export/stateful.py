"""Nemotron-H with every layer's inference state as explicit tensors.

transformers keeps generation state in a Python cache object that it mutates in place; ONNX graphs
(and any runtime without that object) need the state as plain inputs and outputs instead:

* Mamba layer ``i``: ``conv.{i}`` ``[B, I + 2GN, K]`` (the last K inputs of the depthwise conv, the
  mamba-ssm layout) and ``ssm.{i}`` ``[B, H, P, N]`` in float32;
* attention layer ``i``: ``key.{i}`` and ``value.{i}`` ``[B, kv_heads, T, head_dim]`` (no RoPE in
  Nemotron-H, so no positions are needed).

`NemotronHPrefill` maps a prompt to its logits and the state after it; `NemotronHDecode` maps one
token per sequence and a state to the next logits and state.  Both reuse the model's own modules
(projections, norms) and transformers' reference chunked scan, so they agree with the model's own
forward; the tests check prefill + decode against the full-sequence logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MAMBA, ATTENTION = "linear_attention", "full_attention"


@dataclass(frozen=True)
class StateSpec:
    """Name, shape (with ``batch``/``past`` as symbols) and dtype of one state tensor."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype


def _mixer_dims(mixer: nn.Module) -> tuple[int, int, int, int, int, int]:
    """(I, conv_dim, H, P, G, N) of a Nemotron-H Mamba2 mixer, read from its weights' module."""
    return (mixer.intermediate_size, mixer.conv_dim, mixer.num_heads, mixer.head_dim, mixer.n_groups,
            mixer.ssm_state_size)


def state_specs(model: nn.Module) -> list[StateSpec]:
    """The state tensors of `model` (a NemotronHForCausalLM), in graph input order."""
    check_supported(model)
    specs = []
    for i, block in enumerate(model.model.layers):
        mixer = block.mixer
        if block.block_type == MAMBA:
            _, conv_dim, heads, head_dim, _, state = _mixer_dims(mixer)
            specs.append(StateSpec(f"conv.{i}", ("batch", conv_dim, mixer.conv_kernel_size), model.dtype))
            specs.append(StateSpec(f"ssm.{i}", ("batch", heads, head_dim, state), torch.float32))
        elif block.block_type == ATTENTION:
            kv_heads = mixer.k_proj.out_features // mixer.head_dim
            for kind in ("key", "value"):
                specs.append(StateSpec(f"{kind}.{i}", ("batch", kv_heads, "past", mixer.head_dim), model.dtype))
    return specs


def check_supported(model: nn.Module) -> None:
    """Raise ValueError unless `model` is a Nemotron-H of Mamba, attention and MLP layers."""
    kinds = getattr(model.config, "layers_block_type", None)
    if getattr(model.config, "model_type", None) != "nemotron_h" or kinds is None:
        raise ValueError(f"stateful export supports model_type 'nemotron_h'; got "
                         f"{getattr(model.config, 'model_type', type(model).__name__)!r}")
    unsupported = sorted(set(kinds) - {MAMBA, ATTENTION, "mlp"})
    if unsupported:
        raise ValueError(f"stateful export: layer kinds {unsupported} (e.g. MoE) are not supported; "
                         f"supported: mamba, attention, mlp")


class _Stateful(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        check_supported(model)
        self.model = model

    def _run(self, input_ids: torch.Tensor, states: tuple[torch.Tensor, ...], step: bool):
        backbone = self.model.model
        hidden = backbone.embeddings(input_ids)
        states = list(states)
        new_states: list[torch.Tensor] = []
        for block in backbone.layers:
            x = block.norm(hidden.to(dtype=block.norm.weight.dtype))
            if block.block_type == MAMBA:
                if step:
                    out, conv, ssm = _mamba_step(block.mixer, x, states.pop(0), states.pop(0))
                else:
                    out, conv, ssm = _mamba_prefill(block.mixer, x)
                new_states += [conv, ssm]
            elif block.block_type == ATTENTION:
                past = (states.pop(0), states.pop(0)) if step else None
                out, key, value = _attention(block.mixer, x, past)
                new_states += [key, value]
            else:
                out = block.mixer(x)
            hidden = hidden + out
        logits = self.model.lm_head(backbone.norm_f(hidden)).float()
        return (logits, *new_states)


class NemotronHPrefill(_Stateful):
    """``input_ids [B, L] -> (logits [B, L, V], *state)``."""

    def forward(self, input_ids: torch.Tensor):
        return self._run(input_ids, (), step=False)


class NemotronHDecode(_Stateful):
    """``(input_ids [B, 1], *state) -> (logits [B, 1, V], *next_state)``."""

    def forward(self, input_ids: torch.Tensor, *states: torch.Tensor):
        return self._run(input_ids, states, step=True)


def _mamba_prefill(mixer: nn.Module, x: torch.Tensor):
    from transformers.models.nemotron_h.modeling_nemotron_h import mamba2_chunk_scan

    batch, length, _ = x.shape
    inner, conv_dim, heads, head_dim, groups, state = _mixer_dims(mixer)
    gate, xbc, dt = mixer.in_proj(x).split([inner, conv_dim, heads], dim=-1)
    xbc = xbc.transpose(1, 2)
    kernel = mixer.conv_kernel_size
    conv_state = F.pad(xbc, (kernel, 0))[:, :, -kernel:]  # the last K inputs, zeros before the prompt
    weight = mixer.conv1d.weight
    xbc = F.conv1d(xbc, weight, mixer.conv1d.bias, padding=kernel - 1, groups=conv_dim)[:, :, :length]
    xbc = mixer.act(xbc).transpose(1, 2)
    xs, b, c = xbc.split([inner, groups * state, groups * state], dim=-1)
    y, ssm_state = mamba2_chunk_scan(
        xs.reshape(batch, length, heads, head_dim), dt, -torch.exp(mixer.A_log.float()),
        b.reshape(batch, length, groups, state), c.reshape(batch, length, groups, state),
        chunk_size=mixer.chunk_size, D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True,
        dt_limit=mixer.time_step_limit, return_final_states=True)
    y = mixer.norm(y.reshape(batch, length, inner), gate)
    return mixer.out_proj(y.to(x.dtype)), conv_state, ssm_state.float()


def _mamba_step(mixer: nn.Module, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
    """One token through the mixer: the recurrence of the chunked scan, with the same dt clamp."""
    batch = x.shape[0]
    inner, conv_dim, heads, head_dim, groups, state = _mixer_dims(mixer)
    gate, xbc, dt = mixer.in_proj(x[:, 0]).split([inner, conv_dim, heads], dim=-1)
    window = torch.cat([conv_state[:, :, 1:], xbc[:, :, None].to(conv_state.dtype)], dim=-1)
    xbc = (window * mixer.conv1d.weight[:, 0, :]).sum(-1)
    if mixer.conv1d.bias is not None:
        xbc = xbc + mixer.conv1d.bias
    xs, b, c = mixer.act(xbc).split([inner, groups * state, groups * state], dim=-1)
    xs = xs.reshape(batch, heads, head_dim).float()
    b = b.reshape(batch, groups, state).float().repeat_interleave(heads // groups, dim=1)
    c = c.reshape(batch, groups, state).float().repeat_interleave(heads // groups, dim=1)
    dt = F.softplus(dt.float() + mixer.dt_bias.float()).clamp(min=mixer.time_step_limit[0])  # [B, H]
    decay = torch.exp(dt * -torch.exp(mixer.A_log.float()))
    ssm_state = ssm_state * decay[:, :, None, None] + (dt[:, :, None] * xs)[..., None] * b[:, :, None, :]
    y = (ssm_state * c[:, :, None, :]).sum(-1) + xs * mixer.D.float()[:, None]
    y = mixer.norm(y.reshape(batch, 1, inner).to(x.dtype), gate[:, None])
    return mixer.out_proj(y.to(x.dtype)), window, ssm_state


def _attention(mixer: nn.Module, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None):
    batch, length, _ = x.shape
    shape = (batch, length, -1, mixer.head_dim)
    q = mixer.q_proj(x).view(shape).transpose(1, 2)
    k = mixer.k_proj(x).view(shape).transpose(1, 2)
    v = mixer.v_proj(x).view(shape).transpose(1, 2)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    repeat = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1),
                                         is_causal=past is None, scale=mixer.scaling)
    out = mixer.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
    return out, k, v


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation with prefill + decode in PyTorch (the reference for the ONNX runner)."""
    prefill, decode = NemotronHPrefill(model).eval(), NemotronHDecode(model).eval()
    logits, *state = prefill(input_ids)
    tokens = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        logits, *state = decode(tokens[-1], *state)
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)
