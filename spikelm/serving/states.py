"""StateStore: the server's saved model states, in memory up to a budget and on disk always.

Two kinds of state, each one row of a SpikeLMCache (fixed size, whatever the history):

- prefix states, keyed by the token ids they have read (a hash of the ids, salted with the model's
  fingerprint): a request whose ids begin with a kept sequence resumes from its state. Lookups
  find the longest kept prefix of a request's ids (one incremental hash over the ids, checked at
  every length the store holds).
- session states, keyed by a client's session id, plus the session's last generated token (not yet
  read by the model: the next request of the session feeds it first).

Every state is written to `directory` as a safetensors file (the cache's tensors; its structure, the
model fingerprint, the token count and a SHA-256 of the tensors in the header's metadata), through a
temporary file, fsync and rename, so a file is either whole or absent, even after kill -9 or a power
cut. A restart indexes the files (headers only) and loads a state when it is used; a file that is
truncated, fails its checksum or does not parse is moved aside (`.corrupt`) with a warning, and a
file of another model (fingerprint) is skipped with a warning: neither is ever used.

Memory: states are held in RAM up to `memory_budget` bytes (least recently used first out: the file
keeps them). Disk: prefix states beyond `disk_budget` bytes are deleted least recently used first;
session states are deleted only by their client. A conversation keeps O(1) prefix states: when a new
state extends a chain of states derived from one another, the chain's states more than two links
back are deleted (unless another conversation branched from them, or they end a system prompt).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from ..models.cache import SpikeLMCache

logger = logging.getLogger("spikelm.serving")

FORMAT = "spikelm-state/1"
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_MAX_HEADER = 1 << 24


class StoreError(Exception):
    """A request the store cannot honour (the API turns it into an error response)."""


class SessionBusy(StoreError):
    pass


class TooManySessions(StoreError):
    pass


def check_session_id(session_id) -> str:
    if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
        raise ValueError("session_id must be 1-128 characters of A-Z, a-z, 0-9, '_' or '-'")
    return session_id


def _hash_tensors(h, tensors: dict[str, torch.Tensor], separator: str = ""):
    """Feed each tensor's name, dtype, shape (then `separator`) and bytes to h, in name order."""
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}{separator}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h


def model_fingerprint(model) -> str:
    """A hash of the model's configuration and weights (dtype included), and of whether its sparse product reads
    int8 weights (set_sparse_inference(int8=True) computes other states): states of another model never match."""
    h = hashlib.blake2b(digest_size=16)
    cfg = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    if any(getattr(m, "sparse_int8", False) for m in model.modules()):
        h.update(b"sparse_int8")  # (nothing added otherwise: float models keep their fingerprints)
    return _hash_tensors(h, model.state_dict()).hexdigest()


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    # the ";" is part of the checksums saved state files carry
    return _hash_tensors(hashlib.sha256(), tensors, ";").hexdigest()


@dataclass(eq=False)
class _Entry:
    kind: str  # "prefix" or "session"
    name: str  # the prefix key (hex) or the session id
    tokens: int  # tokens the state has read (a session's pending token is not among them)
    parent: str | None = None  # prefix: the key of the state this one was computed from
    shared: bool = False  # prefix: ends a system prompt (kept when its chain is pruned)
    pending_token: int | None = None  # session: generated, not yet read by the model
    cache: SpikeLMCache | None = None  # None: on disk only
    nbytes: int = 0
    file_bytes: int = 0
    on_disk: bool = False
    writing: int = 0
    children: int = 0
    busy: bool = False  # session: a request is using it


@dataclass
class SessionState:
    """What a session request starts from (cache None: a new session)."""

    cache: SpikeLMCache | None
    pending_token: int | None
    tokens: int = field(default=0)


def _own(cache: SpikeLMCache) -> SpikeLMCache:
    """A compact copy of a one-row cache. A state fresh from a prefill holds views into the prefill's activations
    (a conv history is the last inputs of a [1, T, C] tensor): kept as is, it would keep all of them alive."""
    if cache.batch_size != 1:
        raise ValueError(f"a kept state is one row, got {cache.batch_size}")
    return cache.select([0])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_header(path: Path) -> tuple[dict, int]:
    """(the safetensors header, its size in bytes); ValueError when the file cannot be one."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > _MAX_HEADER:
            raise ValueError(f"implausible header size {n}")
        raw = f.read(n)
    if len(raw) < n:
        raise ValueError("truncated header")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise ValueError("header has no metadata")
    return header, n


class StateStore:
    """Saved states of one model (see the module docstring). Thread-safe: the engine thread reads and writes
    states, request handlers manage sessions; one writer thread does all file work, in order."""

    def __init__(self, directory, fingerprint: str, memory_budget: int = 1 << 30, disk_budget: int | None = None,
                 max_sessions: int = 10000):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.memory_budget = int(memory_budget)
        self.disk_budget = disk_budget
        self.max_sessions = int(max_sessions)
        self._lock = threading.RLock()
        self._prefix: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._lengths: dict[int, int] = {}  # prefix length -> entries of that length
        self._sessions: dict[str, _Entry] = {}
        self._reserved: set[str] = set()  # new sessions whose first request is running
        self._loaded: OrderedDict[int, _Entry] = OrderedDict()  # entries with a state in memory, LRU first
        self._memory_bytes = 0
        self._disk_bytes = 0
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spikelm-state-writer")
        for sub in ("prefix", "sessions"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        self.skipped = {"foreign": 0, "corrupt": 0}
        self._scan()

    # -- keys ----------------------------------------------------------------------------------
    def _hasher(self):
        h = hashlib.blake2b(digest_size=20)
        h.update(self.fingerprint.encode())
        return h

    def prefix_key(self, ids) -> str:
        h = self._hasher()
        h.update(np.asarray(ids, dtype="<i4").tobytes())
        return h.hexdigest()

    # -- start-up --------------------------------------------------------------------------------
    def _scan(self) -> None:
        foreign = []
        for kind, sub in (("prefix", "prefix"), ("session", "sessions")):
            folder = self.directory / sub
            for path in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime):
                if path.name.endswith(".tmp"):
                    path.unlink(missing_ok=True)  # a write that never finished
                    continue
                if not path.name.endswith(".safetensors"):
                    continue
                try:
                    header, n = _read_header(path)
                    meta = header["__metadata__"]
                    if meta.get("format") != FORMAT:
                        raise ValueError(f"format {meta.get('format')!r}, not {FORMAT}")
                    if meta.get("fingerprint") != self.fingerprint:
                        foreign.append(path.name)
                        continue
                    name = path.name[: -len(".safetensors")]
                    if meta.get("kind") != kind or meta.get("name") != name:
                        raise ValueError("its metadata names another state")
                    if kind == "session" and not SESSION_ID.match(name):
                        raise ValueError("not a valid session id")
                    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                    size = path.stat().st_size
                    if size != 8 + n + end:
                        raise ValueError(f"{size} bytes, the header describes {8 + n + end}")
                    entry = _Entry(kind, name, int(meta["tokens"]), parent=meta.get("parent") or None,
                                   shared=meta.get("shared") == "1", nbytes=int(meta["nbytes"]), file_bytes=size,
                                   on_disk=True)
                    if meta.get("pending_token"):
                        entry.pending_token = int(meta["pending_token"])
                except (ValueError, KeyError, TypeError, OSError) as e:
                    self._quarantine(path, str(e))
                    continue
                self._disk_bytes += entry.file_bytes
                if kind == "prefix":
                    self._prefix[name] = entry
                    self._lengths[entry.tokens] = self._lengths.get(entry.tokens, 0) + 1
                else:
                    self._sessions[name] = entry
        for entry in self._prefix.values():
            if entry.parent in self._prefix:
                self._prefix[entry.parent].children += 1
        if foreign:
            self.skipped["foreign"] += len(foreign)
            logger.warning(f"state store {self.directory}: skipped {len(foreign)} state file(s) of another model "
                           f"(fingerprint differs), e.g. {foreign[0]}")
        if self._prefix or self._sessions:
            logger.info(f"state store {self.directory}: {len(self._prefix)} prefix state(s), {len(self._sessions)} "
                        f"session(s) on disk")

    def _quarantine(self, path: Path, reason: str) -> None:
        self.skipped["corrupt"] += 1
        logger.warning(f"state file {path} is corrupt ({reason}): skipped, moved to {path.name}.corrupt")
        try:
            os.replace(path, path.with_name(path.name + ".corrupt"))
        except OSError:
            pass

    # -- files -----------------------------------------------------------------------------------
    def _path(self, entry: _Entry) -> Path:
        return self.directory / ("prefix" if entry.kind == "prefix" else "sessions") / f"{entry.name}.safetensors"

    def _write(self, entry: _Entry, cache: SpikeLMCache) -> bool:
        """(writer thread) cache to entry's file, atomically; False when the write failed."""
        path = self._path(entry)
        tmp = path.with_name(path.name + ".tmp")
        try:
            tensors, cache_meta = cache.state_dict()
            tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            meta = {"format": FORMAT, "fingerprint": self.fingerprint, "kind": entry.kind, "name": entry.name,
                    "tokens": str(entry.tokens), "nbytes": str(entry.nbytes), "parent": entry.parent or "",
                    "shared": "1" if entry.shared else "",
                    "pending_token": "" if entry.pending_token is None else str(entry.pending_token),
                    "cache": json.dumps(cache_meta), "checksum": tensors_checksum(tensors),
                    "created": str(time.time())}
            data = safetensors.torch.save(tensors, metadata=meta)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except Exception as e:  # noqa: BLE001  (disk full, permissions: the state stays in memory)
            logger.error(f"could not write state {path}: {type(e).__name__}: {e}")
            tmp.unlink(missing_ok=True)
            with self._lock:
                entry.writing -= 1
                if entry.on_disk and self._entry_live(entry):
                    # the file holds the session's previous state: removed, so that neither a restart nor
                    # a reload after eviction resumes a state older than the conversation
                    path.unlink(missing_ok=True)
                    self._disk_bytes -= entry.file_bytes
                    entry.on_disk = False
            return False
        with self._lock:
            entry.writing -= 1
            live = self._entry_live(entry)
            if live:
                if entry.on_disk:
                    self._disk_bytes -= entry.file_bytes
                entry.on_disk, entry.file_bytes = True, len(data)
                self._disk_bytes += entry.file_bytes
                self._trim_disk()
                self._trim_memory()  # it may leave memory now that the file holds it
            elif self._named(entry) is None:  # deleted while being written (a replacement rewrites the file)
                path.unlink(missing_ok=True)
        return True

    def _named(self, entry: _Entry) -> _Entry | None:
        return (self._prefix if entry.kind == "prefix" else self._sessions).get(entry.name)

    def _entry_live(self, entry: _Entry) -> bool:
        return self._named(entry) is entry

    def _load(self, entry: _Entry) -> SpikeLMCache | None:
        """entry's state from its file (checked), or None: the file is gone, or bad and moved aside."""
        path = self._path(entry)
        try:
            data = path.read_bytes()
            header, _ = _read_header(path)
            meta = header["__metadata__"]
            if meta.get("fingerprint") != self.fingerprint:
                raise ValueError("fingerprint changed")
            tensors = safetensors.torch.load(data)
            if tensors_checksum(tensors) != meta.get("checksum"):
                raise ValueError("checksum mismatch")
            cache = SpikeLMCache.from_state_dict(tensors, json.loads(meta["cache"]))
            if cache.batch_size != 1 or int(cache.positions[0]) != entry.tokens:
                raise ValueError(f"holds {cache.positions.tolist()} tokens, its metadata says {entry.tokens}")
        except FileNotFoundError:  # deleted meanwhile (_trim_disk, on the writer thread): a plain miss
            with self._lock:
                self._forget(entry)
            return None
        except (ValueError, KeyError, TypeError, OSError, RuntimeError, json.JSONDecodeError) as e:
            with self._lock:
                self._forget(entry)
            self._quarantine(path, str(e))
            return None
        return cache

    # -- memory --------------------------------------------------------------------------------
    def _hold(self, entry: _Entry, cache: SpikeLMCache) -> None:
        if entry.cache is None:
            self._memory_bytes += entry.nbytes
        entry.cache = cache
        self._loaded[id(entry)] = entry
        self._loaded.move_to_end(id(entry))
        self._trim_memory()

    def _trim_memory(self) -> None:
        for key in list(self._loaded):
            if self._memory_bytes <= self.memory_budget:
                break
            entry = self._loaded[key]
            if entry.writing or not entry.on_disk:
                continue  # its only copy
            del self._loaded[key]
            entry.cache = None
            self._memory_bytes -= entry.nbytes

    def _trim_disk(self) -> None:
        if self.disk_budget is None:
            return
        for entry in list(self._prefix.values()):
            if self._disk_bytes <= self.disk_budget:
                break
            if not entry.writing:
                self._delete(entry)

    def _forget(self, entry: _Entry) -> None:
        """Drop entry from the indexes (its file, if any, is left to the caller)."""
        if not self._entry_live(entry):
            return
        if entry.kind == "prefix":
            del self._prefix[entry.name]
            self._lengths[entry.tokens] -= 1
            if not self._lengths[entry.tokens]:
                del self._lengths[entry.tokens]
            parent = self._prefix.get(entry.parent)
            if parent is not None:
                parent.children = max(0, parent.children - 1)
        else:
            del self._sessions[entry.name]
        if entry.cache is not None:
            self._loaded.pop(id(entry), None)
            entry.cache = None
            self._memory_bytes -= entry.nbytes
        if entry.on_disk:
            self._disk_bytes -= entry.file_bytes

    def _delete(self, entry: _Entry) -> None:
        on_disk = entry.on_disk
        self._forget(entry)
        if on_disk or entry.writing:
            path = self._path(entry)
            self._writer.submit(path.unlink, missing_ok=True)

    def _get(self, entry: _Entry) -> SpikeLMCache | None:
        """A copy of entry's state (loaded from disk if need be)."""
        with self._lock:
            cache = entry.cache
            if cache is not None:
                self._loaded.move_to_end(id(entry))
        if cache is None:
            cache = self._load(entry)
            if cache is None:
                return None
            with self._lock:
                if self._entry_live(entry):
                    self._hold(entry, cache)
        return cache.select([0])

    # -- prefix states ---------------------------------------------------------------------------
    def longest_prefix(self, ids, max_len: int) -> tuple[int, SpikeLMCache | None, str | None]:
        """(length, a copy of its state, key) of the longest kept prefix of ids no longer than max_len;
        (0, None, None) when none is kept."""
        with self._lock:
            lengths = sorted(n for n in self._lengths if 0 < n <= min(max_len, len(ids)))
        if not lengths:
            return 0, None, None
        data = np.asarray(ids[: lengths[-1]], dtype="<i4").tobytes()
        h, done, keys = self._hasher(), 0, []
        for n in lengths:
            h.update(data[4 * done:4 * n])
            done = n
            keys.append((n, h.hexdigest()))
        for n, key in reversed(keys):
            with self._lock:
                entry = self._prefix.get(key)
                if entry is not None:
                    self._prefix.move_to_end(key)
            if entry is not None:
                cache = self._get(entry)
                if cache is not None:
                    return n, cache, key
        return 0, None, None

    def has_prefix(self, ids) -> bool:
        with self._lock:
            return self.prefix_key(ids) in self._prefix

    def put_prefix(self, ids, cache: SpikeLMCache, parent: str | None = None, shared: bool = False
                   ) -> tuple[str, Future]:
        """Keep a copy of cache (one row) as the state after ids. Returns its key and a future that resolves
        once it is on disk."""
        key = self.prefix_key(ids)
        done: Future = Future()
        with self._lock:
            old = self._prefix.get(key)
            if old is not None:  # the same ids always give the same state
                self._prefix.move_to_end(key)
                old.shared = old.shared or shared
                done.set_result(True)
                return key, done
            cache = _own(cache)
            entry = _Entry("prefix", key, len(ids), parent=parent, shared=shared, nbytes=cache.nbytes())
            self._prefix[key] = entry
            self._lengths[entry.tokens] = self._lengths.get(entry.tokens, 0) + 1
            if parent in self._prefix:
                self._prefix[parent].children += 1
            entry.writing += 1
            self._hold(entry, cache)
            self._prune_chain(entry)
        return key, self._submit_write(entry, cache)

    def _prune_chain(self, entry: _Entry) -> None:
        chain = [entry]
        while len(chain) < 4 and chain[-1].parent in self._prefix:
            chain.append(self._prefix[chain[-1].parent])
        if len(chain) == 4:
            old = chain[3]
            if not old.shared and old.children <= 1 and not old.writing:
                self._delete(old)

    def _submit_write(self, entry: _Entry, cache: SpikeLMCache) -> Future:
        return self._writer.submit(self._write, entry, cache)

    # -- sessions --------------------------------------------------------------------------------
    def acquire_session(self, session_id: str) -> int:
        """Mark a session in use by one request; returns the tokens of its conversation so far (0: new). Raises
        SessionBusy, TooManySessions."""
        check_session_id(session_id)
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is not None:
                if entry.busy:
                    raise SessionBusy(f"session {session_id!r} is busy with another request")
                entry.busy = True
                return entry.tokens + (entry.pending_token is not None)
            if session_id in self._reserved:
                raise SessionBusy(f"session {session_id!r} is busy with another request")
            if len(self._sessions) + len(self._reserved) >= self.max_sessions:
                raise TooManySessions(f"the server holds its maximum of {self.max_sessions} sessions: delete one "
                                      "(DELETE /v1/sessions/{id}) or restart the server with a larger --max_sessions")
            self._reserved.add(session_id)
            return 0

    def session_state(self, session_id: str) -> SessionState:
        """(engine thread, after acquire_session) a copy of the session's state."""
        with self._lock:
            entry = self._sessions.get(session_id)
        if entry is None:
            return SessionState(None, None, 0)
        cache = self._get(entry)
        if cache is None:
            raise StoreError(f"the saved state of session {session_id!r} could not be read (its file is missing or "
                             "damaged) and has been removed: the session starts again empty with its next request")
        return SessionState(cache, entry.pending_token, entry.tokens)

    def commit_session(self, session_id: str, cache: SpikeLMCache, pending_token: int | None) -> Future:
        """Replace the session's state with a copy of cache (one row) and release it; the future resolves once it
        is on disk."""
        cache = _own(cache)
        with self._lock:
            self._reserved.discard(session_id)
            old = self._sessions.get(session_id)
            entry = _Entry("session", session_id, int(cache.positions[0]), pending_token=pending_token,
                           nbytes=cache.nbytes())
            if old is not None:
                entry.on_disk, entry.file_bytes = old.on_disk, old.file_bytes
                old.on_disk = False  # its file (still counted in _disk_bytes) is entry's now: rewritten in place
                self._forget(old)
            self._sessions[session_id] = entry
            entry.writing += 1
            self._hold(entry, cache)
        return self._submit_write(entry, cache)

    def release_session(self, session_id: str) -> None:
        """Release a session without changing it (a request that failed or was cancelled before generating)."""
        with self._lock:
            self._reserved.discard(session_id)
            entry = self._sessions.get(session_id)
            if entry is not None:
                entry.busy = False

    def delete_session(self, session_id: str) -> bool:
        check_session_id(session_id)
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None:
                if session_id in self._reserved:
                    raise SessionBusy(f"session {session_id!r} is busy with another request")
                return False
            if entry.busy:
                raise SessionBusy(f"session {session_id!r} is busy with a request: wait for it or cancel it first")
            self._delete(entry)
        return True

    def session_info(self, session_id: str) -> dict | None:
        check_session_id(session_id)
        with self._lock:
            entry = self._sessions.get(session_id)
            if entry is None:
                return None
            return {"id": session_id, "object": "session", "tokens": entry.tokens + (entry.pending_token is not None),
                    "state_bytes": entry.nbytes, "busy": entry.busy}

    # -- housekeeping ------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            return {"prefix_states": len(self._prefix), "sessions": len(self._sessions),
                    "memory_bytes": self._memory_bytes, "memory_budget_bytes": self.memory_budget,
                    "disk_bytes": self._disk_bytes, "disk_budget_bytes": self.disk_budget,
                    "states_in_memory": len(self._loaded), "skipped_files": dict(self.skipped)}

    def flush(self) -> None:
        """Wait until every write submitted so far is on disk."""
        self._writer.submit(lambda: None).result()

    def close(self) -> None:
        self._writer.shutdown(wait=True)
