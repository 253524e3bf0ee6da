"""Perplexity of a SpikeLM model, overall and by position, in parallel and in streaming mode.

Two ways to run the same text through a model, which must agree:
- parallel: one forward over the whole sequence (chunk_size=None), or chunks of chunk_size tokens
  each continuing the cache of the previous one (a parallel scan per chunk);
- streaming: through the generation cache, token by token (chunk_size=1: the serial O(1) step, as
  in generation) or in small chunks.
Either way the logits are never materialised for the whole sequence: the LM head and the cross
entropy run block by block, so a 32k-token sequence with a 32k vocabulary fits in memory.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..models import CACHE_NAME

MODES = ("parallel", "streaming")


def _nll_of_spikes(model, spikes: torch.Tensor, targets: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """spikes [n, D] (positions), targets [n] -> per-position negative log-likelihood [n] (float64)."""
    out = []
    for a in range(0, spikes.shape[0], block):
        logits = model.lm_head(spikes[a:a + block]).float()
        out.append(F.cross_entropy(logits, targets[a:a + block], reduction="none").double())
    return torch.cat(out) if out else spikes.new_zeros(0, dtype=torch.float64)


@torch.inference_mode()
def token_nll(model, ids, mode: str = "parallel", chunk_size: int | None = None) -> torch.Tensor:
    """Negative log-likelihood of every token after the first: ids [T] -> nll [T - 1] (float64, nats).

    nll[i] is -log p(ids[i + 1] | ids[: i + 1]). mode "parallel" with chunk_size None is one forward;
    any chunk_size carries the cache from chunk to chunk; mode "streaming" defaults to chunk_size 1
    (the serial step). PSN models keep no cache: only parallel mode without chunks works for them.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score, got {ids.numel()}")
    if mode == "streaming" and chunk_size is None:
        chunk_size = 1
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = ids.to(device)
    T = ids.numel()
    inputs, targets = ids[:-1], ids[1:]
    try:
        if chunk_size is None or chunk_size >= T - 1:
            spikes = model.model(inputs[None], use_cache=False).last_hidden_state[0]
            return _nll_of_spikes(model, spikes, targets).cpu()
        if not model.model.supports_cache:
            raise ValueError("a PSN model keeps no state between chunks: use mode='parallel' with chunk_size=None")
        cache, parts = None, []
        for a in range(0, T - 1, chunk_size):
            out = model.model(inputs[None, a:a + chunk_size], use_cache=True, **{CACHE_NAME: cache})
            cache = out[CACHE_NAME]
            spikes = out.last_hidden_state[0]
            parts.append(_nll_of_spikes(model, spikes, targets[a:a + chunk_size]))
        return torch.cat(parts).cpu()
    finally:
        model.train(was_training)


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean nll) over every position given (any shape)."""
    return math.exp(float(nll.double().mean()))


def bucket_edges(length: int, bucket_size: int) -> list[int]:
    """Edges 0, b, 2b, ... up to length (the last bucket may be shorter)."""
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
    edges = list(range(0, length, bucket_size))
    return edges + [length]


def perplexity_by_bucket(nll: torch.Tensor, edges: list[int]) -> list[dict]:
    """nll [n_sequences, L] (nll[:, i] scores the token at position i + 1) -> one dict per bucket.

    A bucket [start, end) holds the predictions of the tokens at positions start + 1 .. end, i.e. with
    start + 1 .. end tokens of context.
    """
    nll = nll.double().reshape(-1, nll.shape[-1])
    rows = []
    for a, b in zip(edges, edges[1:]):
        part = nll[:, a:b]
        if part.numel() == 0:
            continue
        mean = float(part.mean())
        rows.append({"start": a, "end": b, "tokens": int(part.numel()), "nll": mean, "ppl": math.exp(mean)})
    return rows


def split_windows(ids, length: int, max_windows: int | None = None, stride: int | None = None) -> torch.Tensor:
    """Cut a token stream into windows of `length` tokens starting every `stride` tokens: [n, length].

    stride None (= length) gives non-overlapping windows. A stride shorter than the window puts the
    same text at different positions in different windows, so that a by-position curve averages
    over content instead of following the text (useful when the text is short).
    """
    ids = torch.as_tensor(ids, dtype=torch.long).flatten()
    stride = length if stride is None else stride
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if ids.numel() < length:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {length}")
    windows = ids.unfold(0, length, stride)
    if max_windows is not None:
        windows = windows[:max_windows]
    return windows.contiguous()


def evaluate_by_position(model, windows: torch.Tensor, modes=("parallel",), bucket_size: int = 512,
                         chunk_size: dict | None = None, train_len: int | None = None,
                         progress=None) -> dict:
    """Per-position perplexity of windows [n, L] in each mode, plus the agreement between modes.

    chunk_size: {mode: chunk size or None}. train_len: the model's training block size, used to
    report perplexity over [0, train_len) ("1x") and over the last train_len positions ("Nx").
    """
    chunk_size = chunk_size or {}
    L = windows.shape[1]
    edges = bucket_edges(L - 1, bucket_size)
    result = {"windows": int(windows.shape[0]), "window_tokens": int(L), "bucket_size": bucket_size,
              "train_len": train_len, "modes": {}}
    per_mode = {}
    for mode in modes:
        rows = []
        for i, w in enumerate(windows):
            rows.append(token_nll(model, w, mode, chunk_size.get(mode)))
            if progress:
                progress(f"{mode}: window {i + 1}/{windows.shape[0]} done")
        nll = torch.stack(rows)
        per_mode[mode] = nll
        entry = {"chunk_size": chunk_size.get(mode, 1 if mode == "streaming" else None), "ppl": perplexity(nll),
                 "buckets": perplexity_by_bucket(nll, edges)}
        if train_len:
            first = nll[:, : min(train_len, L - 1)]
            last = nll[:, max(0, L - 1 - train_len):]
            entry["ppl_first_train_len"] = perplexity(first)
            entry["ppl_last_train_len"] = perplexity(last)
            entry["length_multiple"] = (L - 1) / train_len
        result["modes"][mode] = entry
    if len(per_mode) > 1:
        names = list(per_mode)
        a, b = per_mode[names[0]], per_mode[names[1]]
        result["agreement"] = {"modes": names[:2], "max_abs_nll_diff": float((a - b).abs().max()),
                               "ppl_rel_diff": abs(perplexity(a) / perplexity(b) - 1)}
    return result
