"""SpikeLMCache: the generation state of a SpikeLM model, O(1) in the length of the text.

A `transformers.Cache` (so `generate()` and other Hugging Face code treat it like the caches of
Mamba2 or fla models: type checks, beam reordering, `cache_implementation` handling) made of one
`SpikeLMLayerCache` per block. A block's state is every neuron's serial state (DSN: float32
membrane + the conv's last k-1 inputs) and, for attention blocks, the keys and values of the last
window - 1 tokens with their validity (padding) mask. Nothing in it grows with the number of
generated tokens (except with full attention, window=None).

Rows are independent streams: `select`, `concatenate` and `split` move rows between caches (a
server batching sessions), `state_dict` / `from_state_dict` turn a cache into named tensors and back
(to save it as safetensors). Attention keys of the rows of one cache are right-aligned: the newest
token of every row sits in the last column, older columns may be padding (kv_valid False).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..neurons import DSNState, SlidingPSNState

# the state containers a block may hold, by name (for from_state_dict)
STATE_TYPES = {cls.__name__: cls for cls in (DSNState, SlidingPSNState)}


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


def _tensors(state: Any) -> list[torch.Tensor]:
    out = []
    map_state(lambda t: out.append(t) or t, state)
    return out


def _flatten(state: Any, prefix: str, out: dict) -> Any:
    """Named tensors of a nested state into out; returns its structure (JSON-able) for _unflatten."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        out[prefix] = state
        return "tensor"
    if isinstance(state, dict):
        return {"dict": {k: _flatten(v, f"{prefix}.{k}", out) for k, v in state.items()}}
    if isinstance(state, tuple) and type(state).__name__ in STATE_TYPES:
        return {type(state).__name__: [_flatten(v, f"{prefix}.{f}", out) for f, v in zip(state._fields, state)]}
    raise TypeError(f"SpikeLMCache: cannot save a state of type {type(state).__name__}")


def _unflatten(structure: Any, prefix: str, tensors: dict) -> Any:
    if structure is None:
        return None
    if structure == "tensor":
        if prefix not in tensors:
            raise ValueError(f"SpikeLMCache.from_state_dict: tensor {prefix!r} is missing")
        return tensors[prefix]
    if not isinstance(structure, dict) or len(structure) != 1:
        raise ValueError(f"SpikeLMCache.from_state_dict: malformed structure at {prefix!r}")
    (kind, body), = structure.items()
    if kind == "dict":
        return {k: _unflatten(v, f"{prefix}.{k}", tensors) for k, v in body.items()}
    if kind not in STATE_TYPES:
        raise ValueError(f"SpikeLMCache.from_state_dict: unknown state type {kind!r} at {prefix!r}")
    cls = STATE_TYPES[kind]
    if not isinstance(body, list) or len(body) != len(cls._fields):
        raise ValueError(f"SpikeLMCache.from_state_dict: {kind} at {prefix!r} needs {len(cls._fields)} fields")
    return cls(*(_unflatten(v, f"{prefix}.{f}", tensors) for f, v in zip(cls._fields, body)))


def _pad_kv(state: Any, columns: int) -> Any:
    """An attention block's state with its key/value columns left-padded (invalid) to `columns`."""
    if not isinstance(state, dict) or "kv_k" not in state:
        return state
    have = state["kv_k"].shape[2]
    if have == columns:
        return state
    pad = columns - have
    out = dict(state)
    for key in ("kv_k", "kv_v"):
        t = state[key]
        out[key] = torch.cat([t.new_zeros(t.shape[0], t.shape[1], pad, t.shape[3]), t], dim=2)
    out["kv_valid"] = torch.cat([state["kv_valid"].new_zeros(state["kv_valid"].shape[0], pad), state["kv_valid"]], dim=1)
    return out


def _trim_kv(state: Any) -> Any:
    """Drop key/value columns that are padding in every row (they are all on the left: keys are right-aligned)."""
    if not isinstance(state, dict) or "kv_k" not in state:
        return state
    valid = state["kv_valid"]
    used = valid.any(0)
    first = int(used.nonzero()[0]) if used.any() else valid.shape[1]
    if first == 0:
        return state
    out = dict(state)
    out["kv_k"], out["kv_v"] = state["kv_k"][:, :, first:], state["kv_v"][:, :, first:]
    out["kv_valid"] = valid[:, first:]
    return out


class SpikeLMLayerCache(CacheLayerMixin):
    """One block's state (`state`: a nested dict of neuron states and attention keys/values), or None before
    the block has seen a token. SpikeLM blocks read and write it themselves, so `update` is not used."""

    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self, state: Any = None):
        super().__init__()
        self.state = state

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @is_initialized.setter
    def is_initialized(self, value) -> None:  # CacheLayerMixin.__init__ sets it; the state decides
        pass

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError("SpikeLM blocks keep their own state in SpikeLMLayerCache.state; there are no "
                                  "key/value updates to make through the Cache API")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        if isinstance(self.state, dict) and "kv_k" in self.state:
            return self.state["kv_k"].shape[2]
        return 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = None

    def offload(self) -> None:
        self.state = map_state(lambda t: t.to("cpu", non_blocking=True), self.state)

    def prefetch(self) -> None:
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = map_state(lambda t: t.index_select(0, indices.to(t.device)), self.state)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = map_state(lambda t: t.repeat_interleave(repeats, dim=0), self.state)

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a SpikeLM state cannot be cropped: a recurrent state holds no per-token history to remove")

    def __repr__(self) -> str:
        return f"SpikeLMLayerCache({'empty' if self.state is None else sum(t.numel() for t in _tensors(self.state))})"


class SpikeLMCache(Cache):
    """Generation cache of a SpikeLM model: one SpikeLMLayerCache per block, the state of the spike layer in front
    of the LM head (`final`), the real tokens seen per row (`positions`, the next rotary position), the token
    columns processed (`length`, padding included) and the columns of generate()'s input_ids consumed.

    SpikeLMCache(config) or SpikeLMCache(num_layers); an empty cache is a fresh model state.
    """

    def __init__(self, config=None, num_layers: int | None = None):
        if isinstance(config, int):
            config, num_layers = None, config
        if num_layers is None:
            if config is None:
                raise ValueError("SpikeLMCache needs a SpikeLMConfig or num_layers")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[SpikeLMLayerCache() for _ in range(num_layers)])
        self.final: Any = None
        self.positions: torch.Tensor | None = None  # [B] long: real tokens seen per row
        self.length = 0  # token columns processed so far (left padding included)
        self.input_ids_consumed = 0  # columns of generate()'s input_ids seen (prompt embeds are not among them)

    # -- what Hugging Face code asks of a Cache --------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def batch_size(self) -> int | None:
        return None if self.positions is None else self.positions.shape[0]

    @property
    def is_compileable(self) -> bool:
        return False

    def _rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.final = map_state(fn, self.final)
        if self.positions is not None:
            self.positions = fn(self.positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep the rows beam search selected (in place)."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def reset(self) -> None:
        """Forget everything: a fresh model state."""
        super().reset()
        self.final, self.positions, self.length, self.input_ids_consumed = None, None, 0, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise ValueError("a SpikeLM state cannot be cropped: a recurrent state holds no per-token history to remove "
                         "(assisted generation and DoLa-style rollback do not apply)")

    # -- rows as independent streams -------------------------------------------------------------
    def _all_states(self) -> list:
        return [layer.state for layer in self.layers] + [self.final]

    def nbytes(self) -> int:
        """Bytes held by the cache: flat in the generated length."""
        return sum(t.numel() * t.element_size() for s in self._all_states() for t in _tensors(s))

    def select(self, indices) -> "SpikeLMCache":
        """A new cache holding the given rows (the original is unchanged)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        out = SpikeLMCache(num_layers=len(self.layers))
        out.layers = [SpikeLMLayerCache(_trim_kv(map_state(lambda t: t.index_select(0, idx.to(t.device)), l.state)))
                      for l in self.layers]
        out.final = map_state(lambda t: t.index_select(0, idx.to(t.device)), self.final)
        out.positions = None if self.positions is None else self.positions.index_select(0, idx.to(self.positions.device))
        out.length, out.input_ids_consumed = self.length, self.input_ids_consumed
        return out

    def split(self) -> list["SpikeLMCache"]:
        """One single-row cache per row."""
        return [self.select([i]) for i in range(self.batch_size or 0)]

    @classmethod
    def concatenate(cls, caches: list["SpikeLMCache"]) -> "SpikeLMCache":
        """One cache whose rows are the rows of `caches`, in order (all from the same model, none empty).
        Attention keys of shorter rows are left-padded with invalid columns, so every row stays right-aligned."""
        if not caches:
            raise ValueError("SpikeLMCache.concatenate needs at least one cache")
        n = len(caches[0].layers)
        for c in caches:
            if len(c.layers) != n:
                raise ValueError(f"SpikeLMCache.concatenate: caches of {len(c.layers)} and {n} layers (different models)")
            if c.positions is None:
                raise ValueError("SpikeLMCache.concatenate: an empty cache has no rows (run a token through it first)")
        out = cls(num_layers=n)
        for i in range(n):
            states = [c.layers[i].state for c in caches]
            cols = max(c.layers[i].get_seq_length() for c in caches)
            states = [_pad_kv(s, cols) for s in states]
            out.layers[i].state = _concat_states(states)
        out.final = _concat_states([c.final for c in caches])
        out.positions = torch.cat([c.positions for c in caches])
        out.length = max(c.length for c in caches)
        return out

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(named tensors, JSON-able metadata) from which from_state_dict rebuilds this cache."""
        tensors: dict[str, torch.Tensor] = {}
        structure = [_flatten(l.state, f"layers.{i}", tensors) for i, l in enumerate(self.layers)]
        final = _flatten(self.final, "final", tensors)
        if self.positions is not None:
            tensors["positions"] = self.positions
        meta = {"num_layers": len(self.layers), "layers": structure, "final": final, "length": self.length,
                "input_ids_consumed": self.input_ids_consumed}
        return tensors, meta

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "SpikeLMCache":
        """The cache state_dict() described; raises ValueError when tensors and metadata disagree."""
        if not isinstance(meta, dict) or not isinstance(meta.get("layers"), list):
            raise ValueError("SpikeLMCache.from_state_dict: metadata without a 'layers' list")
        out = cls(num_layers=len(meta["layers"]))
        for i, structure in enumerate(meta["layers"]):
            out.layers[i].state = _unflatten(structure, f"layers.{i}", tensors)
        out.final = _unflatten(meta.get("final"), "final", tensors)
        out.positions = tensors.get("positions")
        out.length = int(meta.get("length", 0))
        out.input_ids_consumed = int(meta.get("input_ids_consumed", 0))
        rows = {t.shape[0] for s in out._all_states() for t in _tensors(s)}
        if out.positions is not None:
            rows.add(out.positions.shape[0])
        if len(rows) > 1:
            raise ValueError(f"SpikeLMCache.from_state_dict: tensors disagree on the number of rows ({sorted(rows)})")
        return out

    def __repr__(self) -> str:
        return f"SpikeLMCache(layers={len(self.layers)}, rows={self.batch_size}, length={self.length}, bytes={self.nbytes()})"


def _concat_states(states: list) -> Any:
    first = states[0]
    if first is None:
        if any(s is not None for s in states):
            raise ValueError("SpikeLMCache.concatenate: some caches hold a state for a layer where others hold none")
        return None
    if isinstance(first, torch.Tensor):
        return torch.cat(states, dim=0)
    if isinstance(first, dict):
        if any(not isinstance(s, dict) or s.keys() != first.keys() for s in states):
            raise ValueError("SpikeLMCache.concatenate: the caches' states differ in structure (different models?)")
        return {k: _concat_states([s[k] for s in states]) for k in first}
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(_concat_states([s[j] for s in states]) for j in range(len(first))))
    raise TypeError(f"SpikeLMCache: cannot handle a state of type {type(first).__name__}")
