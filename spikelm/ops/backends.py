"""Which backend an op ran: every op family notes it, `record_backends` collects it.

    with record_backends() as ran:
        neuron(x)
    assert ran == [("dsn", "c")]

An op resolves its `backend=` argument ("auto" picks one; an explicit choice that cannot run is an
error, never a silent fallback) and then calls `note_backend(op, backend)` with the one it runs, so
a test can tell a kernel from its fallback even where both give the same numbers. Nothing is noted
while torch.compile traces (a compiled graph replays without the Python dispatch) and outside a
`record_backends` block the note costs one list check.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_local = threading.local()
_recording = 0  # record_backends blocks open in any thread: the common case (none) costs one global read
_recording_lock = threading.Lock()


def _logs() -> list:
    logs = getattr(_local, "logs", None)
    if logs is None:
        logs = _local.logs = []
    return logs


@contextlib.contextmanager
def record_backends():
    """Collect (op, backend) pairs, in call order, for every op call made by this thread inside the block."""
    global _recording
    ran: list[tuple[str, str]] = []
    logs = _logs()
    logs.append(ran)
    with _recording_lock:
        _recording += 1
    try:
        yield ran
    finally:
        with _recording_lock:
            _recording -= 1
        logs.remove(ran)


def is_recording() -> bool:
    """Whether a record_backends block is open in any thread (ops whose kernels cannot note, ask first)."""
    return bool(_recording)


def note_backend(op: str, backend: str) -> None:
    """Record that `op` runs on `backend` (called by the ops after they resolve their backend)."""
    # is_compiling first: dynamo folds it to True and never reads _recording, so a compiled graph does not
    # guard on (and recompile for) whether a record_backends block is open
    if torch.compiler.is_compiling() or not _recording:
        return
    for ran in getattr(_local, "logs", ()):
        ran.append((op, backend))
