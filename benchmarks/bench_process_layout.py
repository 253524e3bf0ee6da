"""How much one process's address layout moves the per-call cost of small CPU ops (and so a decode step).

Each process measures, on one thread, the microseconds per call of three ops a decoding step is made of:
`spike_linear` (the C++ kernel, a 1280 x 320 float32 weight, 1/8 of the inputs fired, batch 1), its int8
product, and `torch.add` on 1280 floats (nothing but the dispatcher's fixed cost). It runs them in
--processes fresh processes with the address layout randomised as usual (ASLR, random hash seed) and
in as many with it fixed (`setarch -R`, PYTHONHASHSEED=0: every process gets the same layout), the two
modes alternating so that a drift in the machine's load reaches both alike (where `setarch -R` is
missing or not permitted, only the randomised mode runs):

    python benchmarks/bench_process_layout.py [--processes 8]

Prints a table (each process's figures, then median / min / max per mode) and writes
benchmarks/results/process_layout.json with the machine, the load average and every process's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT = HERE / "results" / "process_layout.json"
sys.path.insert(0, str(HERE))
from timing import Stopwatch, cpu_info  # noqa: E402


def measure() -> dict:
    """One process's figures (microseconds per call, the median of 7 loops)."""
    import torch

    from spikelm.ops.spike_linear import kernel_calls, spike_linear

    torch.set_num_threads(1)
    torch.manual_seed(0)
    weight = torch.randn(1280, 320)
    spikes = torch.zeros(1, 320)
    spikes[0, torch.randperm(320)[:40]] = 2.0
    z = torch.zeros(1280)
    ops = {"spike_linear_us": (lambda: spike_linear(spikes, weight, None, 1.0), 2000),
           "spike_linear_int8_us": (lambda: spike_linear(spikes, weight, None, 1.0, True), 2000),
           "add_us": (lambda: torch.add(z, 1.0), 4000)}
    out = {}
    for name, (fn, n) in ops.items():
        for _ in range(200):
            fn()
        loops = []
        for _ in range(7):
            with Stopwatch() as sw:
                for _ in range(n):
                    fn()
            loops.append(sw.wall / n * 1e6)
        out[name] = sorted(loops)[3]
    out["kernel_calls"] = kernel_calls()
    return out


def fixed_layout_works() -> bool:
    """Whether `setarch -R` runs here (it is missing on some systems; containers may forbid turning ASLR off)."""
    if not shutil.which("setarch"):
        return False
    return subprocess.run(["setarch", platform.machine(), "-R", "true"], capture_output=True).returncode == 0


def run_process(fixed: bool) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child"]
    env = dict(os.environ)
    env.pop("PYTHONHASHSEED", None)  # an inherited seed would fix the "randomised" layout's hash seed
    if fixed:
        cmd = ["setarch", platform.machine(), "-R", *cmd]
        env["PYTHONHASHSEED"] = "0"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(rows: list[dict], key: str) -> tuple[float, float, float]:
    vals = sorted(r[key] for r in rows)
    return vals[len(vals) // 2], vals[0], vals[-1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=8, help="fresh processes per mode")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(measure()))
        return
    if args.processes < 1:
        raise SystemExit("--processes must be >= 1")
    modes = ["randomised"] + (["fixed"] if fixed_layout_works() else [])
    load_before = os.getloadavg()
    results = {mode: [] for mode in modes}
    for _ in range(args.processes):
        for mode in modes:
            results[mode].append(run_process(mode == "fixed"))
    load_after = os.getloadavg()
    keys = ["spike_linear_us", "spike_linear_int8_us", "add_us"]
    print("| layout | process | " + " | ".join(keys) + " |")
    print("| --- | ---: | " + " | ".join("---:" for _ in keys) + " |")
    for mode, rows in results.items():
        for i, r in enumerate(rows):
            print(f"| {mode} | {i} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    for mode, rows in results.items():
        cells = []
        for k in keys:
            med, lo, hi = summary(rows, k)
            cells.append(f"{med:.2f} ({lo:.2f}-{hi:.2f})")
        print(f"| {mode} | median (min-max) | " + " | ".join(cells) + " |")
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": cpu_info(),
        "load_before": load_before, "load_after": load_after,
        "command": "python benchmarks/bench_process_layout.py --processes " + str(args.processes),
        "results": results}, indent=1) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
