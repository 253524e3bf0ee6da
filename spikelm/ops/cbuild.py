"""Build and load the package's CPU kernels (csrc/) on first use: the system compiler, ctypes, a per-user cache.

A kernel is C files (compiled with `cc` or $CC), plus, for one that registers a torch op kernel,
C++ files compiled with `c++` (or $CXX) against the installed torch's headers and linked with its
libraries. The library goes into $SPIKELM_CACHE_DIR/kernels (default ~/.cache/spikelm/kernels),
keyed by the sources, the flags, the compilers, the torch version (for C++) and this CPU's
instruction set (-march=native), and is renamed into place atomically so concurrent processes (DDP
ranks) never load a half-written file. Entry points are called through ctypes.

`CLibrary(name, sources, declare)` loads lazily and at most once per process; when there is no
compiler, the build fails or SPIKELM_CPU_KERNEL=0 is set, `available()` is False, `unavailable_reason()`
says why and one RuntimeWarning is emitted, so callers fall back to their torch path.
"""
from __future__ import annotations

import contextlib
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


def _compiler(env: str, names: tuple[str, ...], what: str) -> str:
    compiler = os.environ.get(env) or next((path for path in map(shutil.which, names) if path), None)
    if compiler is None:
        raise RuntimeError(f"no {what} compiler found ({', '.join(names)}; or set ${env})")
    return compiler


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed on {what}: {proc.stderr.strip()[-2000:]}")


def _torch_flags() -> tuple[list[str], list[str], str]:
    """(C++ compile flags, link flags, a key) for code that includes torch's headers and links its libraries."""
    import torch  # noqa: PLC0415 - only C++ kernels need it

    root = Path(torch.__file__).resolve().parent
    lib = str(root / "lib")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cflags = ["-std=c++17", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-isystem", str(root / "include")]
    ldflags = [f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    return cflags, ldflags, f"torch {torch.__version__} {root}"


@contextlib.contextmanager
def _build_lock(target: Path):
    """One build per target at a time across processes (DDP ranks, test workers): the others wait, then find it."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX
    except ImportError:  # no flock: concurrent builds are still safe (atomic rename), only repeated
        yield
        return
    with open(target.with_suffix(".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def compile_library(name: str, sources: dict[str, bytes], flags: list[str] = FLAGS) -> Path:
    """The shared library built from sources ({file name: text}; .c as C, .cpp as C++ against torch), compiled now
    unless the cache already holds it."""
    cc = _compiler("CC", ("cc", "gcc", "clang"), "C")
    cxx = [_compiler("CXX", ("c++", "g++", "clang++"), "C++")] if any(n.endswith(".cpp") for n in sources) else []
    cxxflags, ldflags, torch_key = _torch_flags() if cxx else ([], [], "")
    key = hashlib.sha256(b"".join(n.encode() + b"\0" + t for n, t in sorted(sources.items())) + " ".join(
        [cc, *cxx, *flags, *cxxflags, *ldflags, torch_key, platform.machine(), _cpu_signature()]).encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        if not target.exists():
            _build(name, sources, flags, target, cc, cxx, cxxflags, ldflags)
    return target


def _build(name: str, sources: dict[str, bytes], flags: list[str], target: Path, cc: str, cxx: list[str],
           cxxflags: list[str], ldflags: list[str]) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=target.parent) as work:
            paths = []
            for file, text in sources.items():
                paths.append(os.path.join(work, file))
                Path(paths[-1]).write_bytes(text)
            if not cxx:
                _run([cc, *flags, "-o", tmp, *paths], f"{name} ({', '.join(sources)})")
            else:  # C to objects, C++ to objects, linked by the C++ driver
                objects, compile_flags = [], [f for f in flags if f != "-shared"]
                for path in paths:
                    objects.append(path + ".o")
                    cmd = [*cxx, *compile_flags, *cxxflags] if path.endswith(".cpp") else [cc, *compile_flags]
                    _run([*cmd, "-c", path, "-o", objects[-1]], os.path.basename(path))
                _run([*cxx, *flags, "-o", tmp, *objects, *ldflags], f"linking {name}")
        os.chmod(tmp, 0o755)  # mkstemp made it private: a shared cache directory serves every user
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class CLibrary:
    """A kernel library loaded on first use. declare(lib) sets the ctypes signatures of its entry points."""

    def __init__(self, name: str, sources: list[Path], declare: Callable[[ctypes.CDLL], None]):
        self.name = name
        self._sources = sources
        self._declare = declare
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._error: str | None = None

    def sources(self) -> dict[str, bytes]:
        """{file name: text} of the library's sources."""
        out = {}
        for path in self._sources:
            if path.is_file():
                out[path.name] = path.read_bytes()
            else:  # a saved model's folder (trust_remote_code) carries no csrc/: its bundle embeds the sources
                from .csrc_sources import SOURCES  # noqa: PLC0415 - only written into such folders

                out[path.name] = SOURCES[path.name].encode()
        return out

    def load(self) -> ctypes.CDLL | None:
        if self._lib is not None or self._error is not None:
            return self._lib
        with self._lock:
            if self._lib is None and self._error is None:
                if os.environ.get("SPIKELM_CPU_KERNEL", "1") == "0":
                    self._error = "turned off by SPIKELM_CPU_KERNEL=0"
                else:
                    try:
                        lib = ctypes.CDLL(str(compile_library(self.name, self.sources())))
                        self._declare(lib)
                        self._lib = lib
                    except Exception as e:  # noqa: BLE001 - any failure means: use the torch path
                        self._error = f"{type(e).__name__}: {e}"
                        warnings.warn(f"spikelm: the CPU kernel {self.name} is unavailable ({self._error}); "
                                      "the (slower) torch path runs instead", RuntimeWarning, stacklevel=3)
        return self._lib

    def available(self) -> bool:
        return self.load() is not None

    def unavailable_reason(self) -> str | None:
        self.load()
        return self._error
