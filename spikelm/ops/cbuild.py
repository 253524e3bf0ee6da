"""Build and load the package's C kernels (csrc/*.c) on first use: the system compiler, ctypes, a per-user cache.

Each kernel is one C file compiled with `cc` (or $CC) into $SPIKELM_CACHE_DIR/kernels (default
~/.cache/spikelm/kernels), keyed by the source, the flags and this CPU's instruction set
(-march=native), and renamed into place atomically so concurrent processes (DDP ranks) never load
a half-written file. No torch headers are needed: the kernels take raw pointers through ctypes.

`CLibrary(name, source, declare)` loads lazily and at most once per process; when there is no
compiler, the build fails or SPIKELM_CPU_KERNEL=0 is set, `available()` is False, `unavailable_reason()`
says why and one RuntimeWarning is emitted, so callers fall back to their torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Callable

CSRC = Path(__file__).resolve().parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    root = os.environ.get("SPIKELM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "spikelm")
    return Path(root) / "kernels"


def compile_library(name: str, source: bytes, flags: list[str] = FLAGS) -> Path:
    """The shared library built from `source` (C), compiled now unless the cache already holds it."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang; or set $CC)")
    key = hashlib.sha256(source + " ".join([compiler, *flags, platform.machine(), _cpu_signature()]).encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, src = tempfile.mkstemp(suffix=".c", dir=target.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(source)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, "-o", tmp, src], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {name}.c: {proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp made it private: a shared cache directory serves every user
        os.replace(tmp, target)
    finally:
        for p in (tmp, src):
            if os.path.exists(p):
                os.unlink(p)
    return target


class CLibrary:
    """A C kernel loaded on first use. declare(lib) sets the ctypes signatures of its entry points."""

    def __init__(self, name: str, source: Path | Callable[[], bytes], declare: Callable[[ctypes.CDLL], None]):
        self.name = name
        self._source = source
        self._declare = declare
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._error: str | None = None

    def source(self) -> bytes:
        if not isinstance(self._source, Path):
            return self._source()
        if self._source.is_file():
            return self._source.read_bytes()
        # a saved model's folder (trust_remote_code) carries no csrc/: its bundle embeds the sources
        from .csrc_sources import SOURCES  # noqa: PLC0415 - only written into such folders

        return SOURCES[self._source.name].encode()

    def load(self) -> ctypes.CDLL | None:
        if self._lib is not None or self._error is not None:
            return self._lib
        with self._lock:
            if self._lib is None and self._error is None:
                if os.environ.get("SPIKELM_CPU_KERNEL", "1") == "0":
                    self._error = "turned off by SPIKELM_CPU_KERNEL=0"
                else:
                    try:
                        lib = ctypes.CDLL(str(compile_library(self.name, self.source())))
                        self._declare(lib)
                        self._lib = lib
                    except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
                        self._error = f"{type(e).__name__}: {e}"
                        warnings.warn(f"spikelm: the C kernel {self.name} is unavailable ({self._error}); "
                                      "the (slower) torch path runs instead", RuntimeWarning, stacklevel=3)
        return self._lib

    def available(self) -> bool:
        return self.load() is not None

    def unavailable_reason(self) -> str | None:
        self.load()
        return self._error
