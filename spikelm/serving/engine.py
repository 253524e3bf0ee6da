"""Engine: continuous batching of generation requests over one SpikeLM model, in one worker thread.

The model runs only in the engine's thread (one forward at a time); request handlers submit
GenerationRequests and read what the engine produces from each request's Channel. Each iteration:

1. new requests are admitted while fewer than max_batch are active. A request starts from the longest
   kept prefix state of its token ids (StateStore) or from its session's state, and reads the rest of
   its prompt in parallel chunks (one forward per chunk: the scan, never token by token), at most
   prefill_chunk tokens of prefill per iteration while others are decoding, so a long prompt delays
   the running streams by one chunk at a time. Its first token comes from the prompt's last logits.
2. one decode step for every running request: the rows of one batched SpikeLMCache take one token
   each in a single forward, then each row samples with its own parameters and torch.Generator.
   Requests join the batch (SpikeLMCache.concatenate) and leave it (select) between steps; the batch
   persists across steps (re-concatenating every step costs more than the step itself).
3. a request leaves as soon as it is finished (EOS, a stop string, max_tokens) or cancelled (its client
   disconnected). A request whose client does not read its output (more than max_backlog tokens
   waiting) leaves the batch too, parked with its state, and rejoins once the client has caught up:
   the engine never waits for a client.

States kept (when the prefix cache is on): one token before each text boundary of a prompt (a chat
message's end, the end of a system prompt, the end of a completion prompt), and one token before the
end of the text a client will send back next time (the prompt plus its completion, as end_ids gives
its ids). One token before, because a request must feed at least one token to get logits: a request
that repeats a prompt resumes there and feeds its last token; one that extends it feeds the rest.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..models.cache import SpikeLMCache
from ..models.modeling_spikelm import CACHE_NAME
from ..models.streaming import SamplingParams, sample_token
from .states import StateStore, StoreError
from .text import IncrementalDetokenizer, StopMatcher

logger = logging.getLogger("spikelm.serving")


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere. A prefill's activations are freed when it ends, but glibc keeps
    the freed heap pages (between the small tensors of the states kept meanwhile) resident: trimming when the
    engine goes idle returns them, so the server's RSS follows the states it holds."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None
    return trim


_MALLOC_TRIM = _malloc_trim()


class Channel:
    """What the engine produced for one request and the client has not read yet (thread-safe).

    Text pieces are joined while they wait, so a slow reader gets fewer, larger pieces; `backlog`
    counts the tokens behind them (the engine parks a request whose backlog grows too long).
    Events after the text: ("finish", reason), ("done", info), ("error", (status, message)).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, on_read: Callable[[], None] | None = None):
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._text: list[str] = []
        self._events: list[tuple] = []
        self._backlog = 0
        self._loop = loop
        self._waiter: asyncio.Future | None = None
        self._on_read = on_read

    @property
    def backlog(self) -> int:
        return self._backlog

    def push(self, text: str = "", tokens: int = 0, event: tuple | None = None) -> None:
        with self._lock:
            if text:
                self._text.append(text)
            self._backlog += tokens
            if event is not None:
                self._events.append(event)
            self._cond.notify_all()
            waiter = self._waiter
        if waiter is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake, waiter)

    @staticmethod
    def _wake(waiter: asyncio.Future) -> None:
        if not waiter.done():
            waiter.set_result(None)

    def _take(self) -> tuple[str, list[tuple]] | None:
        if not self._text and not self._events and not self._backlog:  # tokens without text yet count too
            return None
        text, events = "".join(self._text), self._events
        self._text, self._events, self._backlog = [], [], 0
        return text, events

    def _read(self, got):
        if got is not None and self._on_read is not None:
            self._on_read()
        return got

    async def get(self) -> tuple[str, list[tuple]]:
        """(text, events) produced since the last call; waits until there is something."""
        while True:
            with self._lock:
                got = self._take()
                if got is None:
                    self._waiter = self._loop.create_future()
                    waiter = self._waiter
            if got is not None:
                return self._read(got)
            try:
                await waiter
            finally:
                with self._lock:
                    self._waiter = None

    def get_sync(self, timeout: float | None = None) -> tuple[str, list[tuple]]:
        with self._lock:
            got = self._take()
            if got is None:
                self._cond.wait(timeout)
                got = self._take()
        return self._read(got) or ("", [])


@dataclass(eq=False)
class GenerationRequest:
    """One completion to generate.

    prompt_ids: the prompt's token ids (a session request: the new tokens only; may then be empty).
    boundaries: token counts of prompt_ids at which its text has a boundary worth resuming from (chat:
        each message's end), with whether it is shared by many conversations (a system prompt's end).
    end_ids: given the completion's text, the token ids of what the client will send back next time
        (prompt + completion); None: keep no end state.
    """

    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=0.0))
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    session_id: str | None = None
    boundaries: list[tuple[int, bool]] = field(default_factory=list)
    end_ids: Callable[[str], list[int]] | None = None
    penalty_window: int = 64
    cancelled: bool = False
    channel: Channel | None = None
    created: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Row:
    """A request the engine is working on: its generation state and bookkeeping."""

    req: GenerationRequest
    cache: SpikeLMCache | None = None  # its own state while it is out of the batch
    last: int | None = None  # the last sampled token, not yet read by the model
    gen: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    recent: deque = field(default_factory=deque)
    generator: torch.Generator | None = None
    detok: IncrementalDetokenizer | None = None
    stopper: StopMatcher | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    parent: str | None = None  # key of the last prefix state this request kept or started from
    finish_reason: str | None = None
    futures: list[Future] = field(default_factory=list)
    pending_jobs: int = 0
    state_lost: bool = False  # a state it keeps could not be computed
    state_bytes: int = 0
    started: bool = False  # has generated (a session then keeps what it generated)

    @property
    def greedy(self) -> bool:
        p = self.req.params
        return p.temperature == 0 and p.repetition_penalty == 1.0


@dataclass(eq=False)
class _Prefill:
    """Feed ids[done:] into cache in parallel chunks, keeping states at `keep` lengths. row: the request whose
    prompt this is (sampled from when done), or the request whose end state this computes (end=True)."""

    ids: list[int]
    done: int
    cache: SpikeLMCache | None
    keep: list[tuple[int, bool]]
    row: _Row
    end: bool = False
    logits: torch.Tensor | None = None


class Engine:
    """Continuous-batching generation over one model (see the module docstring). start() runs the worker."""

    def __init__(self, model, tokenizer, store: StateStore | None, *, max_batch: int = 64, prefill_chunk: int = 256,
                 chunk_size: int = 1024, prefix_cache: bool = True, max_backlog: int = 256):
        if not getattr(getattr(model, "model", None), "supports_cache", False):
            raise ValueError("the server needs a SpikeLM model with a serial state (a PSN model keeps none)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.store = store
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.chunk_size = chunk_size
        self.prefix_cache = prefix_cache and store is not None
        self.max_backlog = max_backlog
        self.device = next(model.parameters()).device
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        self.eos_ids = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        self._inbox: deque[GenerationRequest] = deque()
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._queue: deque[GenerationRequest] = deque()  # admitted later (the batch is full)
        self._prefills: deque[_Prefill] = deque()
        self._rows: list[_Row] = []  # the rows of self._batch, in order
        self._batch: SpikeLMCache | None = None
        self._joining: list[_Row] = []
        self._parked: list[_Row] = []
        self._running = False
        self._thread: threading.Thread | None = None
        self.counters = {"requests": 0, "decode_steps": 0, "tokens_generated": 0, "prompt_tokens": 0,
                         "cached_tokens": 0, "grouped_prefills": 0, "errors": 0}
        self._published = self._count()

    # -- public, any thread ----------------------------------------------------------------------
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="spikelm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, req: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> Channel:
        """Queue req; returns the channel its output arrives on. A session must have been acquired in the store."""
        req.channel = Channel(loop, on_read=self._wakeup.set)
        with self._lock:
            self._inbox.append(req)
        self._wakeup.set()
        return req.channel

    def cancel(self, req: GenerationRequest) -> None:
        req.cancelled = True
        self._wakeup.set()

    def stats(self) -> dict:
        """Counts as the worker left them after its last iteration (read mid-iteration, a row moving from one
        list to another would be in neither), the queue as it is now, and the counters."""
        with self._lock:
            inbox = len(self._inbox)
        return {**self._published, "queued": self._published["queued"] + inbox, "max_batch": self.max_batch,
                **self.counters}

    def _count(self) -> dict:
        return {"running": len(self._rows) + len(self._joining), "parked": len(self._parked),
                "prefilling": sum(not p.end for p in self._prefills), "queued": len(self._queue)}

    # -- the worker --------------------------------------------------------------------------------
    def _loop(self) -> None:
        was_busy = False
        with torch.no_grad():
            while self._running:
                try:
                    busy = self._iteration()
                except Exception:  # noqa: BLE001  (the engine must outlive any one failure)
                    logger.exception("engine iteration failed")
                    self._fail_all("internal error in the engine (see the server log)")
                    busy = False
                self._published = self._count()
                if not busy:
                    if was_busy and _MALLOC_TRIM is not None:
                        _MALLOC_TRIM(0)
                    self._wakeup.wait(timeout=0.5)
                    self._wakeup.clear()
                was_busy = busy
        self._fail_all("the server is shutting down", status=503)

    def _iteration(self) -> bool:
        with self._lock:
            while self._inbox:
                self._queue.append(self._inbox.popleft())
        self._reap_cancelled()
        self._admit()
        if self._prefills:
            self._prefill(self.prefill_chunk if self._rows else self.chunk_size)
        self._unpark()
        if self._joining:
            self._join()
        if self._rows:
            self._decode_step()
        return bool(self._rows or self._prefills or self._joining or (self._queue and self._active() < self.max_batch))

    def _active(self) -> int:
        return len(self._rows) + len(self._joining) + len(self._parked) + sum(not p.end for p in self._prefills)

    # -- admission and prefill ----------------------------------------------------------------------
    def _admit(self) -> None:
        while self._queue and self._active() < self.max_batch:
            req = self._queue.popleft()
            row = _Row(req)
            try:
                self._start(row)
            except StoreError as e:
                self._fail(row, 500, str(e))
            except Exception as e:  # noqa: BLE001  (one request that cannot start fails alone)
                logger.exception("could not start a request")
                self._fail(row, 500, f"could not start the request: {type(e).__name__}: {e}")
            self.counters["requests"] += 1

    def _start(self, row: _Row) -> None:
        req = row.req
        p = req.params
        row.generator = torch.Generator(device="cpu")
        if req.seed is not None:
            row.generator.manual_seed(req.seed)
        else:
            row.generator.seed()
        row.detok = IncrementalDetokenizer(self.tokenizer)
        row.stopper = StopMatcher(req.stop)
        if p.repetition_penalty != 1.0:
            row.recent = deque(maxlen=req.penalty_window)
        ids, done, cache, keep = req.prompt_ids, 0, None, []
        if req.session_id is not None:
            state = self.store.session_state(req.session_id)
            cache = state.cache
            ids = ([state.pending_token] if state.pending_token is not None else []) + list(ids)
            row.cached_tokens = 0 if cache is None else int(cache.positions[0])
            row.prompt_tokens = row.cached_tokens + len(ids)
        else:
            if self.prefix_cache:
                done, cache, row.parent = self.store.longest_prefix(ids, len(ids) - 1)
                keep = [(b - 1, shared) for b, shared in req.boundaries if b - 1 > done]
            row.cached_tokens, row.prompt_tokens = done, len(ids)
        self.counters["prompt_tokens"] += row.prompt_tokens
        self.counters["cached_tokens"] += row.cached_tokens
        if row.recent.maxlen:
            row.recent.extend(ids[-req.penalty_window:])
        self._prefills.append(_Prefill(list(ids), done, cache, sorted(set(keep)), row))

    def _forward(self, ids, cache):
        x = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(1, -1)
        out = self.model(x, use_cache=True, logits_to_keep=1, **{CACHE_NAME: cache})
        return out[CACHE_NAME], out.logits[0, -1]

    def _prefill(self, budget: int) -> None:
        while budget > 0 and self._prefills:
            group = self._fresh_group(budget)
            if len(group) > 1:
                budget -= self._prefill_together(group)
                continue
            task = self._prefills[0]
            stop = next((n for n, _ in task.keep if n > task.done), len(task.ids))
            n = min(budget, self.chunk_size, stop - task.done)
            try:
                task.cache, task.logits = self._forward(task.ids[task.done:task.done + n], task.cache)
            except Exception as e:  # noqa: BLE001
                logger.exception("prefill failed")
                self._prefills.popleft()
                if task.end:  # the reply was sent: only its end state is lost
                    task.row.state_lost = True
                    self._job_done(task.row)
                else:
                    self._fail(task.row, 500, f"the model failed on the prompt: {type(e).__name__}: {e}")
                continue
            task.done += n
            budget -= n
            while task.keep and task.keep[0][0] <= task.done:
                length, shared = task.keep.pop(0)
                if length == task.done:
                    self._keep_prefix(task.row, task.ids[:length], task.cache, shared)
            if task.done == len(task.ids):
                self._prefills.popleft()
                if task.end:
                    self._job_done(task.row)
                else:
                    self._prompt_done(task)

    def _fresh_group(self, budget: int) -> list[_Prefill]:
        """Prompts that start from a fresh state (no kept prefix, no session), from the head of the queue on,
        at most `budget` tokens in all: they can share one left-padded forward."""
        head = self._prefills[0]
        if head.end or head.cache is not None or head.done:
            return []
        group, tokens = [], 0
        for task in self._prefills:
            if task.end or task.cache is not None or task.done or len(task.ids) > self.chunk_size:
                continue
            if group and tokens + len(task.ids) > budget:
                break
            group.append(task)
            tokens += len(task.ids)
        return group

    def _prefill_together(self, group: list[_Prefill]) -> int:
        """Read the prompts of fresh rows in one batch, left-padded (padding is allowed before a row's first
        token), cut into column chunks wherever a row keeps a state. Returns the tokens read."""
        self.counters["grouped_prefills"] += 1
        lengths = [len(t.ids) for t in group]
        T = max(lengths)
        pad = self.tokenizer.pad_token_id if getattr(self.tokenizer, "pad_token_id", None) is not None else 0
        ids = torch.full((len(group), T), pad, dtype=torch.long)
        mask = torch.zeros(len(group), T, dtype=torch.long)
        for i, t in enumerate(group):
            ids[i, T - lengths[i]:] = torch.tensor(t.ids)
            mask[i, T - lengths[i]:] = 1
        keeps = {}  # column after which a row keeps a state -> [(row index, length, shared)]
        for i, t in enumerate(group):
            for length, shared in t.keep:
                keeps.setdefault(T - lengths[i] + length, []).append((i, length, shared))
        cuts = sorted(set(keeps) | {T} | set(range(self.chunk_size, T, self.chunk_size)))
        cache, start = None, 0
        ids, mask = ids.to(self.device), mask.to(self.device)
        try:
            for end in cuts:
                out = self.model(ids[:, start:end], attention_mask=mask[:, start:end], use_cache=True,
                                 logits_to_keep=1, **{CACHE_NAME: cache})
                cache, start = out[CACHE_NAME], end
                for i, length, shared in keeps.get(end, []):
                    self._keep_prefix(group[i].row, group[i].ids[:length], cache.select([i]), shared)
        except Exception as e:  # noqa: BLE001
            logger.exception("batched prefill failed")
            for t in group:
                self._prefills.remove(t)
                self._fail(t.row, 500, f"the model failed on the prompt: {type(e).__name__}: {e}")
            return sum(lengths)
        logits = out.logits[:, -1]
        for i, t in enumerate(group):
            self._prefills.remove(t)
            t.cache, t.logits, t.done, t.keep = cache.select([i]), logits[i], lengths[i], []
            self._prompt_done(t)
        return sum(lengths)

    def _keep_prefix(self, row: _Row, ids: list[int], cache: SpikeLMCache, shared: bool = False) -> None:
        key, fut = self.store.put_prefix(ids, cache, row.parent, shared)
        row.parent = key
        row.futures.append(fut)

    def _prompt_done(self, task: _Prefill) -> None:
        row = task.row
        row.cache = task.cache
        if row.req.cancelled:
            self._finish(row, "cancelled")
            return
        token = self._sample(row, task.logits)
        if self._take_token(row, token):
            self._finish(row)
        else:
            self._joining.append(row)

    # -- decoding ----------------------------------------------------------------------------------
    def _sample(self, row: _Row, logits: torch.Tensor, greedy_token: int | None = None) -> int:
        if row.greedy:
            return int(torch.argmax(logits)) if greedy_token is None else greedy_token
        recent = torch.tensor(list(row.recent), dtype=torch.long) if row.recent else None
        return sample_token(logits, row.req.params, recent, row.generator)

    def _take_token(self, row: _Row, token: int) -> bool:
        """Record a sampled token and send its text; True when the request is finished."""
        req = row.req
        row.started = True
        row.last = token
        row.gen.append(token)
        if row.recent.maxlen:
            row.recent.append(token)
        self.counters["tokens_generated"] += 1
        eos = token in self.eos_ids and not req.ignore_eos
        out = row.stopper.add(row.detok.add(token))
        reason = None
        if row.stopper.stopped:
            reason = "stop"
        elif eos or len(row.gen) >= req.max_tokens:
            out += row.stopper.add(row.detok.flush())
            out += row.stopper.flush()
            reason = "stop" if eos or row.stopper.stopped else "length"
        if out:
            row.text.append(out)
        row.finish_reason = reason
        req.channel.push(out, 1, ("finish", reason) if reason else None)
        return reason is not None

    def _decode_step(self) -> None:
        rows = self._rows
        tokens = torch.tensor([[r.last] for r in rows], dtype=torch.long, device=self.device)
        try:
            out = self.model(tokens, use_cache=True, logits_to_keep=1, **{CACHE_NAME: self._batch})
        except Exception as e:  # noqa: BLE001
            logger.exception("decode step failed")
            batch, self._rows, self._batch = rows, [], None
            for row in batch:
                self._fail(row, 500, f"the model failed while decoding: {type(e).__name__}: {e}")
            return
        self._batch = out[CACHE_NAME]
        self.counters["decode_steps"] += 1
        logits = out.logits[:, -1]
        greedy = logits.argmax(-1).tolist()
        leaving = {}
        for i, row in enumerate(rows):
            # a cancelled row takes its token too: its state has read `last`, so `last` moves on
            finished = self._take_token(row, self._sample(row, logits[i], greedy[i]))
            if row.req.cancelled:
                leaving[i] = "cancelled"
            elif finished:
                leaving[i] = "finished"
            elif row.req.channel.backlog > self.max_backlog:
                leaving[i] = "parked"
        if leaving:
            self._leave(leaving)

    def _join(self) -> None:
        parts = ([self._batch] if self._batch is not None else []) + [r.cache for r in self._joining]
        for r in self._joining:
            r.cache = None
        self._batch = SpikeLMCache.concatenate(parts) if len(parts) > 1 else parts[0]
        self._rows = self._rows + self._joining
        self._joining = []

    def _leave(self, leaving: dict[int, str]) -> None:
        for i, why in leaving.items():
            self._rows[i].cache = self._batch.select([i])
        keep = [i for i in range(len(self._rows)) if i not in leaving]
        gone = [(self._rows[i], why) for i, why in leaving.items()]
        self._batch = self._batch.select(keep) if keep else None
        self._rows = [self._rows[i] for i in keep]
        for row, why in gone:
            if why == "parked":
                self._parked.append(row)
            else:
                self._finish(row, "cancelled" if why == "cancelled" else None)

    def _unpark(self) -> None:
        for row in list(self._parked):
            if row.req.cancelled:
                self._parked.remove(row)
                self._finish(row, "cancelled")
            elif row.req.channel.backlog == 0:
                self._parked.remove(row)
                self._joining.append(row)

    def _reap_cancelled(self) -> None:
        for req in [r for r in self._queue if r.cancelled]:
            self._queue.remove(req)
            if req.session_id is not None:
                self.store.release_session(req.session_id)
        for task in [t for t in self._prefills if t.row.req.cancelled and not t.end]:
            self._prefills.remove(task)
            self._finish(task.row, "cancelled")
        for row in [r for r in self._joining if r.req.cancelled]:
            self._joining.remove(row)
            self._finish(row, "cancelled")

    # -- the end of a request ---------------------------------------------------------------------
    def _finish(self, row: _Row, why: str | None = None) -> None:
        """The request generates no more: keep its states, then report it done once they are on disk.
        row.cache holds its state (prompt + generated tokens but the last) unless it never finished its prompt."""
        req = row.req
        cancelled = why == "cancelled"
        if row.cache is not None:
            row.state_bytes = row.cache.nbytes()
        if req.session_id is not None:
            if row.started and row.cache is not None:
                row.futures.append(self.store.commit_session(req.session_id, row.cache, row.last))
            else:
                self.store.release_session(req.session_id)
        elif self.prefix_cache and req.end_ids is not None and not cancelled and row.cache is not None:
            self._keep_end(row)
        row.cache = None
        if cancelled:
            row.finish_reason = row.finish_reason or "cancelled"
        self._job_done(row, initial=True)

    def _keep_end(self, row: _Row) -> None:
        """Keep the state one token before the end of the text the client will send back (see the docstring)."""
        try:
            want = list(row.req.end_ids("".join(row.text)))[:-1]
        except Exception as e:  # noqa: BLE001  (a template that cannot render the reply: keep nothing more)
            logger.warning(f"could not tokenize a reply to keep its state: {type(e).__name__}: {e}")
            return
        if not want:
            return
        fed = row.req.prompt_ids + row.gen[:-1]
        if want == fed:
            self._keep_prefix(row, want, row.cache)
            return
        if len(want) > len(fed) and want[:len(fed)] == fed:
            start, cache = len(fed), row.cache
        else:
            start, cache, key = self.store.longest_prefix(want, len(want))
            if start == len(want):
                return
            row.parent = key
        row.pending_jobs += 1
        self._prefills.append(_Prefill(want, start, cache, [(len(want), False)], row, end=True))

    def _job_done(self, row: _Row, initial: bool = False) -> None:
        if not initial:
            row.pending_jobs -= 1
        if row.pending_jobs:
            return
        futures = list(row.futures)
        info = {"finish_reason": row.finish_reason, "prompt_tokens": row.prompt_tokens,
                "completion_tokens": len(row.gen), "cached_tokens": row.cached_tokens,
                "state_bytes": row.state_bytes, "state_saved": not row.state_lost}
        remaining = [len(futures)]
        lock = threading.Lock()

        def one_done(future: Future | None = None):
            try:
                saved = future is None or bool(future.result())  # a write's result: False when it failed
            except Exception:  # noqa: BLE001
                saved = False
            with lock:
                remaining[0] -= 1
                info["state_saved"] = info["state_saved"] and saved
                last = remaining[0] <= 0
            if last:
                if not info["state_saved"]:
                    logger.warning("a request completed without all of its states saved (see the error above); "
                                   "its response says state_saved: false")
                row.req.channel.push(event=("done", info))

        if not futures:
            one_done()
        for f in futures:
            f.add_done_callback(one_done)

    def _fail(self, row: _Row, status: int, message: str) -> None:
        self.counters["errors"] += 1
        if row.req.session_id is not None:
            self.store.release_session(row.req.session_id)
        row.req.channel.push(event=("error", (status, message)))

    def _fail_all(self, message: str, status: int = 500) -> None:
        rows = self._rows + self._joining + self._parked + [t.row for t in self._prefills if not t.end]
        ending = [t.row for t in self._prefills if t.end]  # replies sent, end states pending
        self._rows, self._joining, self._parked, self._batch = [], [], [], None
        self._prefills.clear()
        for row in rows:
            self._fail(row, status, message)
        for row in ending:  # complete without the end state
            row.state_lost = True
            self._job_done(row)
        with self._lock:
            queued = list(self._queue) + list(self._inbox)
            self._queue.clear()
            self._inbox.clear()
        for req in queued:
            self._fail(_Row(req), status, message)
