"""StreamingGenerator: unbounded text streams from a SpikeLM model in constant memory.

    gen = StreamingGenerator(model, tokenizer, temperature=0.8, top_p=0.95, seed=0)
    gen.feed("Once upon a time")             # the prompt runs in parallel chunks through the cache
    for piece in gen.generate_text(100):     # then one token per step, O(1) state
        print(piece, end="", flush=True)
    gen.feed("\\nUser: and then?\\n")          # a later turn continues the same state: no history is re-read

What it holds: the model's SpikeLMCache (neuron membranes and conv histories, plus the last
window - 1 keys/values of attention blocks), the logits of the last position, and the last
`penalty_window` token ids (for the repetition penalty). Nothing grows with the stream: the text
itself is never kept. Sampling is done here on the logits (temperature, top-k, top-p, repetition
penalty over the recent window) rather than through transformers' generate(), whose input_ids
grow with every token.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch

from .modeling_spikelm import CACHE_NAME


@dataclass
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off; repetition_penalty 1 is none."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        check_sampling_params(self.temperature, self.top_k, self.top_p, self.repetition_penalty)


def check_sampling_params(temperature, top_k, top_p, repetition_penalty) -> None:
    """Raise ValueError naming the first invalid sampling parameter."""
    def number(v):
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

    if not number(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
    if not number(top_p) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] (1 = off), got {top_p!r}")
    if not number(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {repetition_penalty!r}")


def process_logits(logits: torch.Tensor, params: SamplingParams, recent: torch.Tensor | None = None) -> torch.Tensor:
    """logits [V] -> filtered, temperature-scaled float32 logits (-inf where a token is excluded).

    The repetition penalty (CTRL / transformers convention) divides a positive logit of a recently
    seen token by the penalty and multiplies a negative one by it; recent holds token ids.
    """
    x = logits.float().clone()
    if params.repetition_penalty != 1.0 and recent is not None and recent.numel():
        ids = torch.unique(recent.to(x.device))
        picked = x[ids]
        x[ids] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if params.temperature == 0:
        return x
    x = x / params.temperature
    if params.top_k and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        # drop a token when the tokens strictly more likely than it already reach top_p (the first always stays)
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        x = x.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return x


def sample_token(logits: torch.Tensor, params: SamplingParams, recent: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> int:
    """One token id from logits [V] under params (argmax when temperature is 0)."""
    x = process_logits(logits, params, recent)
    if params.temperature == 0:
        return int(torch.argmax(x))
    probs = torch.softmax(x, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class StreamingGenerator:
    """Holds a SpikeLM model's O(1) generation state and streams tokens from it, without end.

    Args:
        model: a SpikeLMForCausalLM (DSN, LIF or sliding-PSN neurons; PSN models keep no state).
        tokenizer: its tokenizer (needed for feed(text) and generate_text; feed_ids/generate work without).
        temperature, top_k, top_p, repetition_penalty: sampling defaults (see SamplingParams);
            generate() takes per-call overrides.
        penalty_window: how many recent tokens the repetition penalty looks at (a bounded window,
            so memory stays constant; prompt tokens count too).
        chunk_size: tokens per parallel chunk in feed() (bounds the activation memory of long prompts).
        seed: seeds the generator's own torch.Generator (reproducible sampling).
        stop_at_eos: generate() stops after the tokenizer's/model's EOS token; False streams on.
    """

    def __init__(self, model, tokenizer=None, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, penalty_window: int = 64, chunk_size: int = 1024,
                 seed: int | None = None, stop_at_eos: bool = True):
        if not getattr(getattr(model, "model", None), "supports_cache", False):
            raise ValueError("StreamingGenerator needs a SpikeLM model with a serial state; a PSN model keeps none "
                             "(its neurons are tied to absolute time steps): use model.generate() for it")
        if isinstance(penalty_window, bool) or not isinstance(penalty_window, int) or penalty_window < 0:
            raise ValueError(f"penalty_window must be an integer >= 0, got {penalty_window!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        self.penalty_window = penalty_window
        self.chunk_size = chunk_size
        self.stop_at_eos = stop_at_eos
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device="cpu")
        if seed is not None:
            self.generator.manual_seed(seed)
        else:
            self.generator.seed()
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        self.eos_token_ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything: a fresh model state, as before any feed."""
        self.cache = None
        self.logits: torch.Tensor | None = None  # [V] logits after the last token fed or generated
        self.recent: deque[int] = deque(maxlen=self.penalty_window)
        self.tokens_seen = 0
        self._pending: list[int] = []  # generated ids not yet decoded to text (an unfinished UTF-8 char)

    def state_nbytes(self) -> int:
        """Bytes of model state held (the cache): constant once the attention windows have filled."""
        return 0 if self.cache is None else self.cache.nbytes()

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor) -> None:
        out = self.model(ids.view(1, -1).to(self.device), use_cache=True, logits_to_keep=1,
                         **{CACHE_NAME: self.cache})
        self.cache = out[CACHE_NAME]
        self.logits = out.logits[0, -1]
        self.tokens_seen += ids.numel()

    # -- input ---------------------------------------------------------------------------------
    def feed_ids(self, ids) -> None:
        """Run token ids through the model, chunk_size at a time in parallel, continuing the state.

        Every id is checked first (an integer in [0, vocab_size)): a bad one is a ValueError naming it and
        its position, and the state is left as it was."""
        raw = torch.as_tensor(ids)
        if raw.numel() and (raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool):
            raise TypeError(f"feed_ids takes integer token ids, got {raw.dtype}")
        ids = raw.to(torch.long).flatten()
        vocab = self.model.config.vocab_size
        bad = ((ids < 0) | (ids >= vocab)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"feed_ids: token id {int(ids[i])} at position {i} is outside the vocabulary [0, {vocab})")
        for start in range(0, ids.numel(), self.chunk_size):
            self._forward(ids[start:start + self.chunk_size])
        self.recent.extend(ids[-self.penalty_window:].tolist() if self.penalty_window else [])

    def feed(self, text: str) -> int:
        """Tokenize text (no special tokens added) and feed it; returns the number of tokens fed."""
        if self.tokenizer is None:
            raise ValueError("feed(text) needs a tokenizer: pass one to StreamingGenerator, or use feed_ids")
        if not isinstance(text, str):
            raise TypeError(f"feed takes a str, got {type(text).__name__}")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids:
            self.feed_ids(ids)
        return len(ids)

    # -- output --------------------------------------------------------------------------------
    def generate(self, n: int | None, **overrides) -> Iterator[int]:
        """Yield up to n token ids (None: without end), each fed back into the state as it is made.

        overrides: temperature, top_k, top_p, repetition_penalty for this call only. Stops early at
        EOS when stop_at_eos (the EOS id is yielded and fed, so the state has seen it).
        """
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"n must be an integer >= 0 or None (unbounded), got {n!r}")
        params = SamplingParams(**{**vars(self.params), **overrides}) if overrides else self.params
        if self.logits is None and n != 0:
            raise ValueError("nothing to continue from: feed() a prompt (at least one token) first")
        return self._generate(n, params)  # checks above run at the call, not at the first next()

    def _generate(self, n: int | None, params: SamplingParams) -> Iterator[int]:
        made = 0
        while n is None or made < n:
            recent = torch.tensor(list(self.recent), dtype=torch.long) if self.recent else None
            token = sample_token(self.logits, params, recent, self.generator)
            self._forward(torch.tensor([token]))
            if self.penalty_window:
                self.recent.append(token)
            made += 1
            yield token
            if self.stop_at_eos and token in self.eos_token_ids:
                return

    def generate_text(self, n: int | None, skip_special_tokens: bool = True, **overrides) -> Iterator[str]:
        """Like generate, but yields decoded text pieces as soon as they form whole characters."""
        if self.tokenizer is None:
            raise ValueError("generate_text needs a tokenizer")
        return self._generate_text(self.generate(n, **overrides), skip_special_tokens)

    def _generate_text(self, tokens: Iterator[int], skip_special_tokens: bool) -> Iterator[str]:
        for token in tokens:
            piece = self.decode_piece(token, skip_special_tokens)
            if piece:
                yield piece
        tail = self.flush_text(skip_special_tokens)
        if tail:
            yield tail

    def decode_piece(self, token: int, skip_special_tokens: bool = True) -> str:
        """Text of one more generated token, or "" while it ends inside a multi-byte character."""
        self._pending.append(token)
        text = self.tokenizer.decode(self._pending, skip_special_tokens=skip_special_tokens)
        # a byte-level token may end inside a multi-byte character: wait for the rest (bounded)
        if text.endswith("\ufffd") and len(self._pending) < 8:
            return ""
        self._pending.clear()
        return text

    def flush_text(self, skip_special_tokens: bool = True) -> str:
        """Decode whatever is still pending (an unfinished character comes out as U+FFFD)."""
        if not self._pending:
            return ""
        text = self.tokenizer.decode(self._pending, skip_special_tokens=skip_special_tokens)
        self._pending.clear()
        return text
