"""SpikeLMCache: the generation state of a SpikeLM model, O(1) in the length of the text.

Per layer it holds every neuron's serial state (DSN: float32 membrane + the conv's last k-1 inputs)
and, for attention layers, the keys and values of the last window - 1 tokens. Nothing in it grows
with the number of generated tokens (except with full attention, window=None).
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def map_state(fn: Callable[[torch.Tensor], torch.Tensor], state: Any) -> Any:
    """Apply fn to every tensor of a nested state (dicts, named tuples, tensors, None)."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: map_state(fn, v) for k, v in state.items()}
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(map_state(fn, v) for v in state))
    raise TypeError(f"SpikeLMCache: cannot handle a state of type {type(state).__name__}")


def _tensors(state: Any):
    out = []
    map_state(lambda t: out.append(t) or t, state)
    return out


class SpikeLMCache:
    """Generation cache: one state per layer, the next rotary position per row, columns consumed."""

    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: list[Any] = [None] * num_layers
        self.final: Any = None  # state of the spike layer in front of the LM head
        self.positions: torch.Tensor | None = None  # [B] long: real tokens seen per row
        self.length = 0  # token columns processed so far (left padding included)
        self.input_ids_consumed = 0  # columns of generate()'s input_ids seen (prompt embeds are not among them)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    @property
    def batch_size(self) -> int | None:
        return None if self.positions is None else self.positions.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows beam search selected (in place)."""
        select = lambda t: t.index_select(0, beam_idx.to(t.device))  # noqa: E731
        self.layers = [map_state(select, s) for s in self.layers]
        self.final = map_state(select, self.final)
        self.positions = select(self.positions)

    def nbytes(self) -> int:
        """Bytes held by the cache: flat in the generated length."""
        return sum(t.numel() * t.element_size() for s in [*self.layers, self.final] for t in _tensors(s))

    def __repr__(self) -> str:
        return f"SpikeLMCache(layers={len(self.layers)}, length={self.length}, bytes={self.nbytes()})"


def named_state_tensors(state: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """(dotted path, tensor) for every tensor of a nested state: "mlp.in.membrane", "kv_k", ..."""
    if state is None:
        return []
    if isinstance(state, torch.Tensor):
        return [(prefix, state)]
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, tuple) and hasattr(state, "_fields"):
        items = zip(state._fields, state)
    else:
        raise TypeError(f"SpikeLMCache: cannot handle a state of type {type(state).__name__}")
    return [pair for k, v in items for pair in named_state_tensors(v, f"{prefix}.{k}" if prefix else str(k))]
