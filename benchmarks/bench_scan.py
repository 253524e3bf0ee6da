"""Time spikelm.ops.scan backends: forward and forward+backward, achieved GB/s next to memory-copy bandwidth.

Bytes that must move, float32: forward reads x and g and writes h (12 bytes per element);
forward+backward adds reading dh, g and h and writing dx and dg (20 more: 32 bytes per element).
Copy bandwidth is torch's copy_ between two large preallocated buffers, counting bytes read plus
bytes written (8 per element), so the two figures compare directly. Best of --repeat runs after
--warmup runs (wall clock; the process's CPU time is recorded too); the host's load average is recorded before and after, since other jobs may share it.

    python benchmarks/bench_scan.py                         # the full table, JSON under benchmarks/results/
    python benchmarks/bench_scan.py --T 1024,16384 --BD 4096 --repeat 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from spikelm.ops import scan, triton_is_available  # noqa: E402
from spikelm.ops.torch_scan import scan_backward, serial_scan_forward  # noqa: E402
from timing import best_time, copy_bandwidth, cpu_info  # noqa: E402

FWD_BYTES, FWD_BWD_BYTES = 12, 32  # per element, float32


class _SerialScan(torch.autograd.Function):
    """The one-op-per-step loop as a differentiable candidate (its backward is the same loop, reversed)."""

    @staticmethod
    def forward(ctx, x, g):
        h, _ = serial_scan_forward(x, g, None)
        ctx.save_for_backward(g, h)
        return h

    @staticmethod
    def backward(ctx, dh):
        g, h = ctx.saved_tensors
        dx, dg, _ = scan_backward(serial_scan_forward, dh, None, g, h, None, False)
        return dx, dg


def run_candidate(name, x, g):
    if name == "serial":
        return _SerialScan.apply(x, g)
    return scan(x, g, backend=name)[0]


def machine_info(device):
    cpu = cpu_info()["model"]
    thp = None
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), platform=platform.platform(), transparent_hugepage=thp,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--T", type=ints, default=[1024, 2048, 4096, 8192, 16384], help="sequence lengths")
    p.add_argument("--BD", type=ints, default=[256, 4096], help="B*D values (D = BD / B)")
    p.add_argument("--B", type=int, default=1, help="batch size")
    p.add_argument("--backends", default="torch,serial,naive,triton",
                   help="comma list of torch, serial, naive, triton (triton is skipped without CUDA)")
    p.add_argument("--naive-max-T", type=int, default=2048, help="run the naive loop only up to this T")
    p.add_argument("--no-backward", action="store_true", help="time the forward only")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="best of this many timed runs")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/bench_scan_<device>.json)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = [b for b in args.backends.split(",") if b]
    if "triton" in backends and not (device.type == "cuda" and triton_is_available()):
        backends.remove("triton")
    load_before = os.getloadavg()
    copy_before = copy_bandwidth(device)
    print(f"copy bandwidth {copy_before:.1f} GB/s (read+write), {args.threads} threads, load {load_before}")

    rows = []
    header = (f"{'backend':>8} {'B*D':>6} {'T':>6} | {'fwd ms':>9} {'cpu ms':>8} {'GB/s':>6} {'%copy':>6} |"
              f" {'fwd+bwd ms':>10} {'cpu ms':>9} {'GB/s':>6}")
    print(header + "\n" + "-" * len(header))
    for bd in args.BD:
        B, D = args.B, bd // args.B
        for T in args.T:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(B, T, D, generator=gen).to(device)
            g = (torch.nn.functional.logsigmoid(torch.randn(B, T, D, generator=gen)) * 4).to(device)
            dh = torch.randn(B, T, D, generator=gen).to(device)
            n = B * T * D
            for name in backends:
                if name == "naive" and T > args.naive_max_T:
                    continue
                with torch.no_grad():
                    t_fwd, c_fwd = best_time(lambda: run_candidate(name, x, g), device, args.warmup, args.repeat)
                row = dict(backend=name, B=B, D=D, T=T, fwd_s=t_fwd, fwd_cpu_s=c_fwd, fwd_GBps=FWD_BYTES * n / t_fwd / 1e9)
                row["fwd_pct_copy"] = 100 * row["fwd_GBps"] / copy_before
                line = (f"{name:>8} {bd:>6} {T:>6} | {1e3 * t_fwd:>9.2f} {1e3 * c_fwd:>8.2f} {row['fwd_GBps']:>6.2f}"
                        f" {row['fwd_pct_copy']:>5.1f}% |")
                if not args.no_backward:
                    xr, gr = x.clone().requires_grad_(), g.clone().requires_grad_()

                    def fwd_bwd():
                        xr.grad = gr.grad = None
                        run_candidate(name, xr, gr).backward(dh)

                    t_fb, c_fb = best_time(fwd_bwd, device, args.warmup, args.repeat)
                    row.update(fwd_bwd_s=t_fb, fwd_bwd_cpu_s=c_fb, fwd_bwd_GBps=FWD_BWD_BYTES * n / t_fb / 1e9)
                    line += f" {1e3 * t_fb:>10.2f} {1e3 * c_fb:>9.2f} {row['fwd_bwd_GBps']:>6.2f}"
                print(line, flush=True)
                rows.append(row)

    copy_after = copy_bandwidth(device)
    load_after = os.getloadavg()
    print(f"copy bandwidth after: {copy_after:.1f} GB/s; load average before {load_before}, after {load_after}")
    result = dict(benchmark="bench_scan", command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                  machine=machine_info(device), device=str(device), dtype="float32",
                  bytes_per_element=dict(fwd=FWD_BYTES, fwd_bwd=FWD_BWD_BYTES),
                  copy_GBps_read_plus_write=dict(before=copy_before, after=copy_after),
                  loadavg=dict(before=load_before, after=load_after),
                  timing=dict(warmup=args.warmup, repeat=args.repeat, statistic="min"), rows=rows)
    out = args.out or Path(__file__).resolve().parent / "results" / f"bench_scan_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
