"""The spike-sparse training product against the dense one: forward + backward of one linear layer on CPU.

For each shape (rows x in -> out: the tiny config's linears at 8 x 128 tokens, and its LM head) and
input density (the fraction of non-zero spikes), times ops.spike_matmul (the C kernel, forced on
with max_density=1) and F.linear, each as forward + backward with gradients for the input and the
weight; best of --repeat after --warmup, one thread by default (the tiny config trains on one).
MAX_DENSITY, where the op switches to the dense products, comes from these crossovers.

    python benchmarks/bench_spike_matmul.py [--densities 0.05,0.1,0.2,0.3,0.5] [--threads 1]

Prints a table and writes benchmarks/results/bench_spike_matmul.json (the CPU, load average, every cell).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from timing import best_time, cpu_info  # noqa: E402

from spikelm.ops.spike_matmul import MAX_DENSITY, c_kernel_available, spike_matmul  # noqa: E402

SHAPES = [(1024, 128, 512), (1024, 256, 128), (1024, 512, 128), (1024, 128, 2048)]


def spikes(rows: int, cols: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(rows, cols, generator=g) < density) * torch.randint(1, 9, (rows, cols), generator=g)).float()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--densities", default="0.05,0.1,0.2,0.3,0.5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "bench_spike_matmul.json")
    args = ap.parse_args(argv)
    if not c_kernel_available():
        raise SystemExit("the spike_matmul C kernel is unavailable here (no C compiler, or SPIKELM_CPU_KERNEL=0)")
    torch.set_num_threads(args.threads)
    densities = [float(d) for d in args.densities.split(",")]
    load_before = os.getloadavg()
    rows = []
    print(f"| rows x in -> out | density | sparse fwd+bwd ms | dense fwd+bwd ms | dense / sparse |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for R, I, O in SHAPES:
        g = torch.Generator().manual_seed(1)
        w = torch.randn(O, I, generator=g).requires_grad_()
        dy = torch.randn(R, O, generator=g)
        for d in densities:
            x = spikes(R, I, d).requires_grad_()
            sparse, _ = best_time(lambda: spike_matmul(x, w, None, 1.0).backward(dy), warmup=args.warmup,
                                  repeat=args.repeat)
            dense, _ = best_time(lambda: F.linear(x, w).backward(dy), warmup=args.warmup, repeat=args.repeat)
            rows.append({"rows": R, "in": I, "out": O, "density": d, "sparse_s": sparse, "dense_s": dense})
            print(f"| {R} x {I} -> {O} | {d:.2f} | {sparse * 1e3:.2f} | {dense * 1e3:.2f} | {dense / sparse:.2f}x |",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": cpu_info(),
        "threads": args.threads, "max_density": MAX_DENSITY, "load_before": load_before,
        "load_after": os.getloadavg(), "command": "python benchmarks/bench_spike_matmul.py " + " ".join(
            sys.argv[1:] if argv is None else argv), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
