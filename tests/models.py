"""Tiny models for the tests: Hugging Face families from config, and a hybrid written by hand."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def tiny_nemotron_h(pattern: str = "M-M*-", seed: int = 0):
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(seed)
    config = NemotronHConfig(
        vocab_size=96, hidden_size=48, hybrid_override_pattern=pattern, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, intermediate_size=80, mamba_num_heads=8, mamba_head_dim=6,
        n_groups=2, ssm_state_size=8, chunk_size=16, conv_kernel=4, tie_word_embeddings=False,
    )
    return _randomized(NemotronHForCausalLM(config))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    return _randomized(LlamaForCausalLM(config))


def tiny_qwen2(window: int | None = None, seed: int = 0):
    """Qwen2 (q/k/v biases); with `window`, layer 1 of 2 uses sliding-window attention (max_window_layers=1)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    sliding = {"use_sliding_window": True, "sliding_window": window, "max_window_layers": 1} if window else {}
    config = Qwen2Config(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False, **sliding)
    return _randomized(Qwen2ForCausalLM(config))


def tiny_mistral(window: int | None = None, seed: int = 0):
    """Mistral: `sliding_window` applies to every layer (None: full causal attention)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, head_dim=8, sliding_window=window)
    return _randomized(MistralForCausalLM(config))


def tiny_mamba2(seed: int = 0):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    config = Mamba2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, n_groups=2,
                          state_size=8, expand=2, chunk_size=16, tie_word_embeddings=False)
    return _randomized(Mamba2ForCausalLM(config))


def tiny_granite_hybrid(layer_types=("mamba", "attention", "mamba"), experts: int = 0, rope: bool = False,
                        seed: int = 0):
    """GraniteMoeHybrid (Granite 4.0-H): dense shared MLP when `experts` is 0; multipliers away from 1 so
    that a runner forgetting one shows."""
    from transformers import GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM

    torch.manual_seed(seed)
    config = GraniteMoeHybridConfig(
        vocab_size=96, hidden_size=48, num_hidden_layers=len(layer_types), layer_types=list(layer_types),
        num_attention_heads=4, num_key_value_heads=2, shared_intermediate_size=40, intermediate_size=40,
        num_local_experts=experts, num_experts_per_tok=min(2, experts) if experts else 2,
        position_embedding_type="rope" if rope else None, mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8,
        mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16, embedding_multiplier=2.0, residual_multiplier=0.7,
        logits_scaling=0.5, attention_multiplier=0.2, tie_word_embeddings=False,
    )
    return _randomized(GraniteMoeHybridForCausalLM(config))


def tiny_bamba(seed: int = 0):
    """Bamba: Mamba2 and attention (with RoPE) mixers, each followed by a dense MLP."""
    from transformers import BambaConfig, BambaForCausalLM

    torch.manual_seed(seed)
    config = BambaConfig(vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                         attn_layer_indices=[1], num_attention_heads=4, num_key_value_heads=2, mamba_n_heads=8,
                         mamba_n_groups=2, mamba_d_state=8, mamba_d_head=12, mamba_expand=2, mamba_chunk_size=16,
                         tie_word_embeddings=False)
    return _randomized(BambaForCausalLM(config))


def _randomized(model: nn.Module) -> nn.Module:
    """Random, non-trivial values everywhere (norm weights, A_log, D...) so that errors show."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.5 / math.sqrt(param.shape[-1]))
    return model.eval()


def mean_square(x: torch.Tensor, over: int | None) -> torch.Tensor:
    """Mean of squares over the last dim. `over` is for masked references (tests): the sum over `over`
    channels, the kept ones, as the masked ones are zero: what the pruned model's norm computes."""
    squares = x.pow(2)
    return squares.mean(-1, keepdim=True) if over is None else squares.sum(-1, keepdim=True) / over


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.mean_over: int | None = None  # see mean_square

    def forward(self, x):
        return x * torch.rsqrt(mean_square(x, self.mean_over) + 1e-5) * self.weight


class HandMamba2(nn.Module):
    """A Mamba2 mixer written from the paper: in_proj [z|x|B|C|dt], depthwise conv, quadratic SSD."""

    def __init__(self, d: int, heads: int = 6, head_dim: int = 4, groups: int = 3, state: int = 5, kernel: int = 4):
        super().__init__()
        self.h, self.p, self.g, self.n = heads, head_dim, groups, state
        inner, conv_dim = heads * head_dim, heads * head_dim + 2 * groups * state
        self.in_proj = nn.Linear(d, inner + conv_dim + heads, bias=False)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel, groups=conv_dim, padding=kernel - 1)
        self.A_log = nn.Parameter(torch.zeros(heads))
        self.D = nn.Parameter(torch.ones(heads))
        self.dt_bias = nn.Parameter(torch.zeros(heads))
        self.norm_weight = nn.Parameter(torch.ones(inner))
        self.out_proj = nn.Linear(inner, d, bias=False)
        self.mean_over: int | None = None  # of the grouped norm, see mean_square

    def forward(self, u):
        b, l, _ = u.shape
        h, p, g, n = self.h, self.p, self.g, self.n
        z, xbc, dt = self.in_proj(u).split([h * p, h * p + 2 * g * n, h], dim=-1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :l]).transpose(1, 2)
        x, B, C = xbc.split([h * p, g * n, g * n], dim=-1)
        x = x.view(b, l, h, p)
        B = B.view(b, l, g, n).repeat_interleave(h // g, dim=2)
        C = C.view(b, l, g, n).repeat_interleave(h // g, dim=2)
        dt = F.softplus(dt + self.dt_bias)
        log_decay = torch.cumsum(dt * -torch.exp(self.A_log), dim=1)
        decay = torch.exp(log_decay.unsqueeze(2) - log_decay.unsqueeze(1))
        causal = torch.tril(torch.ones(l, l, dtype=torch.bool, device=u.device))
        decay = decay.masked_fill(~causal[None, :, :, None], 0.0)
        scores = torch.einsum("bthn,bshn->btsh", C, B) * decay
        y = torch.einsum("btsh,bshp->bthp", scores, x * dt.unsqueeze(-1)) + x * self.D.unsqueeze(-1)
        y = y.reshape(b, l, h * p) * F.silu(z)
        grouped = y.view(b, l, g, h * p // g)
        grouped = grouped * torch.rsqrt(mean_square(grouped, self.mean_over) + 1e-5)
        return self.out_proj(grouped.view(b, l, h * p) * self.norm_weight)


class HandAttention(nn.Module):
    """Causal attention with GQA through repeat_interleave, matmul and softmax (no SDPA)."""

    def __init__(self, d: int, heads: int = 4, kv_heads: int = 2, head_dim: int = 6):
        super().__init__()
        self.h, self.kv, self.hd = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(d, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, d, bias=False)

    def forward(self, x):
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(b, l, self.kv, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kv, dim=1)
        v = self.v_proj(x).view(b, l, self.kv, self.hd).transpose(1, 2).repeat_interleave(self.h // self.kv, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.hd)
        causal = torch.tril(torch.ones(l, l, dtype=torch.bool, device=x.device))
        probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(b, l, self.h * self.hd))


class HandMLP(nn.Module):
    def __init__(self, d: int, hidden: int = 40):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, d: int, mixer: nn.Module):
        super().__init__()
        self.norm = RMSNorm(d)
        self.mixer = mixer

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class HandHybrid(nn.Module):
    """Mamba2 + MLP + attention + MLP, plain PyTorch (no transformers)."""

    def __init__(self, vocab: int = 64, d: int = 24):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([Block(d, HandMamba2(d)), Block(d, HandMLP(d)), Block(d, HandAttention(d)),
                                     Block(d, HandMLP(d))])
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def hand_hybrid(seed: int = 0) -> HandHybrid:
    torch.manual_seed(seed)
    return _randomized(HandHybrid())


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids) if not hasattr(model, "config") else model(input_ids=ids, use_cache=False)
    return out if isinstance(out, torch.Tensor) else out.logits
