"""The benchmarks' one way to time code: wall and CPU seconds of a block, best of several runs, copy bandwidth.

    with Stopwatch(device) as sw:      # one measurement: sw.wall, sw.cpu (seconds)
        step()
    wall, cpu = best_time(fn, device, warmup=1, repeat=5)
    cpu_info()                         # the CPU's model name and vector extensions, for a result file

Wall time is what a user waits for; CPU time is this process's own work (all its threads), which a
shared machine's other jobs do not inflate the way they inflate wall time: the benchmarks report
both where both matter. On CUDA the device is synchronised before and after, and the wall time is
taken from CUDA events around the block (the kernels' time, not the launch queue's).
"""
from __future__ import annotations

import os
import platform
import time

import torch

_SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile",
               "neon", "asimd", "sve")


def cpu_info() -> dict:
    """This CPU as a result file records it: model name (cpu family / model where a VM masks the name), vector
    extensions, logical CPUs, and torch's CPU capability (the widest SIMD its kernels use here)."""
    info = {"machine": platform.machine(), "model": platform.processor() or platform.machine(), "flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info["model"] = fields.get("model name", info["model"])
        if "cpu family" in fields:
            info["family_model"] = f"{fields['cpu family']}/{fields.get('model', '?')}"
        present = set(fields.get("flags", fields.get("Features", "")).split())
        info["flags"] = [f for f in _SIMD_FLAGS if f in present]
    except OSError:
        pass
    info["cpus"] = os.cpu_count()
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info


def _device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device or "cpu")


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if _device(device).type == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Times the `with` block: .wall and .cpu in seconds."""

    def __init__(self, device="cpu"):
        self.device = _device(device)
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        if self.device.type == "cuda":
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self._end.record()
        sync(self.device)
        self.wall = time.perf_counter() - self._t0
        self.cpu = time.process_time() - self._c0
        if self.device.type == "cuda":
            self.wall = self._start.elapsed_time(self._end) / 1e3


def best_time(fn, device="cpu", warmup: int = 1, repeat: int = 3, slow_s: float = float("inf")) -> tuple[float, float]:
    """(wall, cpu) seconds: the best of `repeat` timed calls of fn() after `warmup` untimed ones (each
    the minimum over the runs: the run least disturbed by anything else). A warm-up slower than slow_s
    leaves one timed call, so that a case taking minutes is not run many times."""
    for _ in range(warmup):
        with Stopwatch(device) as sw:
            fn()
        if sw.wall > slow_s:
            repeat = 1
    walls, cpus = [], []
    for _ in range(max(1, repeat)):
        with Stopwatch(device) as sw:
            fn()
        walls.append(sw.wall)
        cpus.append(sw.cpu)
    return min(walls), min(cpus)


def copy_bandwidth(device="cpu", n_bytes: int = 1 << 30, repeat: int = 10) -> float:
    """GB/s of dst.copy_(src) between two buffers of n_bytes / 2, counting bytes read plus bytes written."""
    n = n_bytes // 8  # two float32 buffers of n_bytes / 2 each
    src = torch.randn(n, device=device)
    dst = torch.zeros_like(src)  # touched once, so page faults are not timed
    wall, _ = best_time(lambda: dst.copy_(src), device, 2, repeat)
    del src, dst
    return 2 * 4 * n / wall / 1e9
