"""Spiking Transformer block: Q, K and V are spike trains; causal attention over a sliding window.

    x ──┬─ norm → neuron → q/k/v_proj → neuron (Q, K, V spikes) → RoPE(Q, K) → window attention
        │                                        → neuron → o_proj ─┐
        └──────────────────────────────────────────────────────────── + ──┴→ x' → spiking MLP (as in the SSM block)

With a window W, each token sees itself and the W - 1 tokens before it, so the KV cache never
holds more than W - 1 entries: generation memory is bounded whatever the text length. With
window=None the attention is full and the cache grows with the text.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .context import SequenceContext
from .mlp import SpikingMLP
from .neuron_layer import NeuronLayer
from .rotary import rotary_embedding


def windowed_causal_attention(q, k, v, key_valid, window, q_doc=None, k_doc=None, block_size: int = 1024,
                              sdpa: bool = True):
    """Softmax attention of the last Tq keys' queries: q [B, H, Tq, hd], k/v [B, H, Tk, hd] with Tk >= Tq.

    Query i sits at key index Tk - Tq + i and sees key j iff j <= i, i - j < window (if a window),
    key_valid[b, j] (False = padding) and the same document (packed mode). Queries are processed in
    blocks so memory stays O(block x (block + window)). A query always sees itself, so a padded
    query gets a finite (ignored) output instead of NaN. sdpa=False computes every block as explicit
    matmul + softmax in float32 (one-token blocks always are: cheaper than SDPA's per-call overhead on CPU).
    """
    B, H, Tq, hd = q.shape
    Tk = k.shape[2]
    offset = Tk - Tq
    out = torch.empty_like(q)
    step = min(block_size, window) if window else block_size
    for a in range(0, Tq, step):
        b = min(Tq, a + step)
        lo = max(0, offset + a - window + 1) if window else 0
        hi = offset + b
        qi = torch.arange(offset + a, offset + b, device=q.device)[:, None]
        kj = torch.arange(lo, hi, device=q.device)[None, :]
        allowed = kj <= qi
        if window:
            allowed = allowed & (qi - kj < window)
        allowed = allowed[None]  # [1, nq, nk]
        if key_valid is not None:
            allowed = allowed & key_valid[:, None, lo:hi]
        if q_doc is not None:
            allowed = allowed & (q_doc[:, a:b, None] == k_doc[:, None, lo:hi])
        allowed = allowed | (qi == kj)[None]
        qb, kb, vb = q[:, :, a:b], k[:, :, lo:hi], v[:, :, lo:hi]
        if b - a == 1 or not sdpa:
            scores = (qb.float() @ kb.float().transpose(-1, -2)) * hd**-0.5
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
            out[:, :, a:b] = (scores.softmax(-1) @ vb.float()).to(q.dtype)
        else:
            out[:, :, a:b] = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed[:, None])
    return out


class SpikingAttentionBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, window: int | None, rope_theta: float,
                 intermediate_size: int, neuron_kwargs: dict, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.window = window
        self.rope_theta = rope_theta
        self.in_spikes = NeuronLayer(hidden_size, neuron_kwargs, eps)
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            proj.feeds_neuron = True
        # inputs computed from spikes drive their neurons unnormalised (see NeuronLayer)
        self.q_spikes = NeuronLayer(hidden_size, neuron_kwargs, eps, normalize=False)
        self.k_spikes = NeuronLayer(hidden_size, neuron_kwargs, eps, normalize=False)
        self.v_spikes = NeuronLayer(hidden_size, neuron_kwargs, eps, normalize=False)
        self.o_spikes = NeuronLayer(hidden_size, neuron_kwargs, eps, normalize=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.mlp = SpikingMLP(hidden_size, intermediate_size, neuron_kwargs, eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: SequenceContext, state: dict | None = None, return_state: bool = False):
        state = state or {}
        B, T, D = x.shape
        s, st_in = self.in_spikes(x, ctx, state.get("in"), return_state)
        q, st_q = self.q_spikes(self.q_proj(s), ctx, state.get("q"), return_state)
        k, st_k = self.k_spikes(self.k_proj(s), ctx, state.get("k"), return_state)
        v, st_v = self.v_spikes(self.v_proj(s), ctx, state.get("v"), return_state)
        q = rotary_embedding(self._heads(q), ctx.positions, self.rope_theta)
        k = rotary_embedding(self._heads(k), ctx.positions, self.rope_theta)
        v = self._heads(v)
        valid = ctx.valid if ctx.valid is not None else torch.ones(B, T, dtype=torch.bool, device=x.device)
        if "kv_k" in state:  # keys and values of the previous tokens inside the window
            k_all = torch.cat([state["kv_k"], k], dim=2)
            v_all = torch.cat([state["kv_v"], v], dim=2)
            valid_all = torch.cat([state["kv_valid"], valid], dim=1)
        else:
            k_all, v_all, valid_all = k, v, valid
        attn = windowed_causal_attention(q, k_all, v_all, valid_all, self.window, ctx.doc_ids, ctx.doc_ids,
                                         sdpa=ctx.attention != "eager")
        attn = attn.transpose(1, 2).reshape(B, T, D)
        o, st_o = self.o_spikes(attn, ctx, state.get("o"), return_state)
        x = x + self.o_proj(o)
        m, st_mlp = self.mlp(x, ctx, state.get("mlp"), return_state)
        new_state = None
        if return_state:
            keep = k_all.shape[2] if self.window is None else min(k_all.shape[2], self.window - 1)
            new_state = {"in": st_in, "q": st_q, "k": st_k, "v": st_v, "o": st_o, "mlp": st_mlp,
                         "kv_k": k_all[:, :, k_all.shape[2] - keep:], "kv_v": v_all[:, :, v_all.shape[2] - keep:],
                         "kv_valid": valid_all[:, valid_all.shape[1] - keep:]}
        return x + m, new_state
