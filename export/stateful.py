"""Hybrid Mamba2 / attention / MLP models with every layer's inference state as explicit tensors.

transformers keeps generation state in a Python cache object that it mutates in place; ONNX graphs
(and any runtime without that object) need the state as plain inputs and outputs instead:

* Mamba layer ``i``: ``conv.{i}`` ``[B, I + 2GN, K]`` (the last K inputs of the depthwise conv, the
  mamba-ssm layout) and ``ssm.{i}`` ``[B, H, P, N]`` in float32;
* attention layer ``i``: ``key.{i}`` and ``value.{i}`` ``[B, kv_heads, T, head_dim]`` (keys after RoPE
  where the model has it; the decode position is the keys' length).

`StatefulPrefill` maps a prompt to its logits and the state after it; `StatefulDecode` maps one
token per sequence and a state to the next logits and state.  One driver serves every family: the
family says which modules run in which order and what kind each residual branch is
(`graphprune.families.runtime.StatefulLayout`: Nemotron-H, Mamba2, dense GraniteMoeHybrid, Bamba, and
Llama, Qwen2 and Mistral), and the driver runs the model's own modules (projections, norms, MLPs,
RoPE) with transformers' reference chunked scan, so it agrees with the model's own forward; the tests
check prefill + decode against the full-sequence logits.  A sliding-window attention layer keeps
every key in its cache and masks the ones outside its window.  A branch of any other kind (MoE
experts) is refused by name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from graphprune.families.runtime import STATEFUL_KINDS, StatefulLayout, stateful_layout


@dataclass(frozen=True)
class StateSpec:
    """Name, shape (with ``batch``/``past`` as symbols) and dtype of one state tensor."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype


def _mixer_dims(mixer: nn.Module) -> tuple[int, int, int, int, int, int]:
    """(I, conv_dim, H, P, G, N) of a transformers Mamba2 mixer (the attribute names its families share)."""
    return (mixer.intermediate_size, mixer.conv_dim, mixer.num_heads, mixer.head_dim, mixer.n_groups,
            mixer.ssm_state_size)


def layout_of(model: nn.Module) -> StatefulLayout:
    """The family's layout of `model`; ValueError unless every branch is a kind the runner carries state through."""
    layout = stateful_layout(model)  # ValueError (NoRuntime) when the family has no runtime hook
    unsupported: dict[str, list[int]] = {}
    for index, layer in enumerate(layout.layers):
        for sub in layer:
            if sub.kind not in STATEFUL_KINDS:
                unsupported.setdefault(sub.kind, []).append(index)
    if unsupported:
        named = "; ".join(f"layer kind {kind!r} (layers {', '.join(map(str, layers))})"
                          for kind, layers in unsupported.items())
        raise ValueError(f"stateful export: {named} is not supported; supported layer kinds: "
                         f"{', '.join(STATEFUL_KINDS)}")
    return layout


def check_supported(model: nn.Module) -> None:
    """Raise ValueError unless `model` has a stateful layout of Mamba, attention and MLP branches only."""
    layout_of(model)


def state_specs(model: nn.Module) -> list[StateSpec]:
    """The state tensors of `model`, in graph input order."""
    return _specs(layout_of(model), model.dtype)


def _specs(layout: StatefulLayout, dtype: torch.dtype) -> list[StateSpec]:
    specs = []
    for i, layer in enumerate(layout.layers):
        stateful = [sub for sub in layer if sub.kind in ("mamba", "attention")]
        if len(stateful) > 1:
            raise ValueError(f"stateful export: layer {i} has {len(stateful)} stateful branches; "
                             "at most one is supported")
        for sub in stateful:
            mixer = sub.mixer
            if sub.kind == "mamba":
                _, conv_dim, heads, head_dim, _, state = _mixer_dims(mixer)
                specs.append(StateSpec(f"conv.{i}", ("batch", conv_dim, mixer.conv_kernel_size), dtype))
                specs.append(StateSpec(f"ssm.{i}", ("batch", heads, head_dim, state), torch.float32))
            else:
                kv_heads = mixer.k_proj.out_features // mixer.head_dim
                for kind in ("key", "value"):
                    specs.append(StateSpec(f"{kind}.{i}", ("batch", kv_heads, "past", mixer.head_dim), dtype))
    return specs


def example_length(model: nn.Module) -> int:
    """A prompt length for tracing: past a whole Mamba chunk (so the scan's padding stays symbolic)."""
    chunks = [sub.mixer.chunk_size for layer in layout_of(model).layers for sub in layer if sub.kind == "mamba"]
    return max(chunks, default=16) + 3


class _Stateful(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.layout = layout_of(model)
        self.specs = _specs(self.layout, model.dtype)
        keys = [i for i, s in enumerate(self.specs) if s.name.startswith("key.")]
        self._past_index = keys[0] if keys else None  # a key cache: its length is the decode position

    def _run(self, input_ids: torch.Tensor, states: tuple[torch.Tensor, ...], step: bool):
        layout = self.layout
        hidden = layout.embeddings(input_ids)
        if layout.embedding_multiplier != 1.0:
            hidden = hidden * layout.embedding_multiplier
        rotary = None
        if layout.rotary is not None and self._past_index is not None:
            start = states[self._past_index].shape[2] if step else 0
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None] + start
            rotary = (layout.rotary(hidden, positions), layout.apply_rotary)
        states = list(states)
        new_states: list[torch.Tensor] = []
        for layer in layout.layers:
            for sub in layer:
                residual = hidden.float() if layout.residual_in_fp32 else hidden
                x = sub.norm(hidden.to(dtype=sub.norm.weight.dtype))
                if sub.kind == "mamba":
                    if step:
                        out, conv, ssm = _mamba_step(sub.mixer, x, states.pop(0), states.pop(0))
                    else:
                        out, conv, ssm = _mamba_prefill(sub.mixer, x)
                    new_states += [conv, ssm]
                elif sub.kind == "attention":
                    past = (states.pop(0), states.pop(0)) if step else None
                    out, key, value = _attention(sub.mixer, x, past, rotary, sub.window)
                    new_states += [key, value]
                else:
                    out = sub.mixer(x)
                if layout.residual_multiplier != 1.0:
                    out = out * layout.residual_multiplier
                hidden = residual + out
        hidden = layout.final_norm(hidden)
        logits = layout.lm_head(hidden.to(layout.lm_head.weight.dtype))
        if layout.logits_divisor != 1.0:
            logits = logits / layout.logits_divisor
        return (logits.float(), *new_states)


class StatefulPrefill(_Stateful):
    """``input_ids [B, L] -> (logits [B, L, V], *state)``."""

    def forward(self, input_ids: torch.Tensor):
        return self._run(input_ids, (), step=False)


class StatefulDecode(_Stateful):
    """``(input_ids [B, 1], *state) -> (logits [B, 1, V], *next_state)``."""

    def forward(self, input_ids: torch.Tensor, *states: torch.Tensor):
        return self._run(input_ids, states, step=True)


def _chunk_scan(mixer: nn.Module):
    """transformers' reference chunked scan, from the mixer's own modeling module (the families' copies agree)."""
    scan = getattr(sys.modules.get(type(mixer).__module__), "mamba2_chunk_scan", None)
    if scan is None:
        from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan as scan
    return scan


def _mamba_prefill(mixer: nn.Module, x: torch.Tensor):
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
    y, ssm_state = _chunk_scan(mixer)(
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
    low, high = mixer.time_step_limit
    dt = F.softplus(dt.float() + mixer.dt_bias.float()).clamp(min=low, max=high)  # [B, H], as the chunked scan
    decay = torch.exp(dt * -torch.exp(mixer.A_log.float()))
    ssm_state = ssm_state * decay[:, :, None, None] + (dt[:, :, None] * xs)[..., None] * b[:, :, None, :]
    y = (ssm_state * c[:, :, None, :]).sum(-1) + xs * mixer.D.float()[:, None]
    y = mixer.norm(y.reshape(batch, 1, inner).to(x.dtype), gate[:, None])
    return mixer.out_proj(y.to(x.dtype)), window, ssm_state


def _attention(mixer: nn.Module, x: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None, rotary=None,
               window: int | None = None):
    """Attention over the keys so far (the past's, then this call's), causal, and with a sliding `window`
    where there is one. The cache keeps every key (its length is the decode position); the window masks."""
    batch, length, _ = x.shape
    shape = (batch, length, -1, mixer.head_dim)
    q = mixer.q_proj(x).view(shape).transpose(1, 2)
    k = mixer.k_proj(x).view(shape).transpose(1, 2)
    v = mixer.v_proj(x).view(shape).transpose(1, 2)
    if rotary is not None:
        (cos, sin), apply_rotary = rotary
        q, k = apply_rotary(q, k, cos, sin)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    repeat = q.shape[1] // k.shape[1]
    mask = None
    if window is not None:  # query i (absolute position) sees keys i - window < j <= i, as transformers' mask
        total = k.shape[2]
        queries = torch.arange(length, device=x.device)[:, None] + (total - length)
        keys = torch.arange(total, device=x.device)[None]
        mask = (keys <= queries) & (keys > queries - window)
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1),
                                         attn_mask=mask, is_causal=past is None and mask is None,
                                         scale=mixer.scaling)
    out = mixer.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
    return out, k, v


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy continuation with prefill + decode in PyTorch (the reference for the ONNX runner)."""
    prefill, decode = StatefulPrefill(model).eval(), StatefulDecode(model).eval()
    logits, *state = prefill(input_ids)
    tokens = [logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(new_tokens - 1):
        logits, *state = decode(tokens[-1], *state)
        tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)
