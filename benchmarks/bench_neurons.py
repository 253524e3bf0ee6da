"""Neuron speed: forward and forward+backward time and peak memory of DSN, PSN, sliding PSN and LIF against T.

Each neuron maps x [B, T, C] -> spikes; forward is timed with autograd recording (training), and
forward+backward adds spikes.backward(grad) with a fixed random grad. Best of --repeat runs after
--warmup (wall clock; the process's CPU time is recorded too). Peak memory is the largest extra memory during one forward+backward over what was held
before it: on CPU the rise of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs,
after malloc_trim),
on CUDA torch.cuda.max_memory_allocated. LIF is a serial Python loop: --lif-max-T caps the lengths
it runs at; nothing is extrapolated, a missing cell is simply not measured.

    python benchmarks/bench_neurons.py                        # table, JSON and PNG under benchmarks/results/
    python benchmarks/bench_neurons.py --T 1024,4096 --lif-max-T 2048 --repeat 2
    python benchmarks/bench_neurons.py --neurons DSN --dsn-backend torch   # one ops.dsn backend against another

Each row records the ops.dsn backend the DSN ran on (ops.record_backends), so "auto" says what it picked.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import machine_info  # noqa: E402
from spikelm.neurons import DSN, LIF, PSN, SlidingPSN  # noqa: E402
from spikelm.ops import record_backends  # noqa: E402
from spikelm.ops.dsn import BACKENDS as DSN_BACKENDS  # noqa: E402
from timing import best_time, sync  # noqa: E402

BUILDERS = {  # name -> neuron over C channels for sequences of T steps (the DSN on an ops.dsn backend)
    "DSN": lambda C, T, backend: DSN(C, backend=backend),
    "PSN": lambda C, T, backend: PSN(C, T),
    "SlidingPSN": lambda C, T, backend: SlidingPSN(C, k=4),
    "LIF": lambda C, T, backend: LIF(C, reset="hard"),
}
NEURONS = tuple(BUILDERS)


def build(name, C, T, dsn_backend="auto"):
    return BUILDERS[name](C, T, dsn_backend)


def _vm_hwm_bytes():
    with open("/proc/self/status") as f:
        return 1024 * int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_extra_memory(fn, device):
    """Bytes of memory fn() needs beyond what is held when it starts (None where it can't be measured)."""
    sync(device)
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap memory back, so RSS is what is live
        base = _rss_bytes()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        fn()
        return _vm_hwm_bytes() - base
    except (OSError, AttributeError, ValueError):
        return None


def plot(rows, Ts, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in NEURONS:
        rs = sorted((r for r in rows if r["neuron"] == name), key=lambda r: r["T"])
        if not rs:
            continue
        T = [r["T"] for r in rs]
        (line,) = axes[0].loglog(T, [r["fwd_bwd_s"] * 1e3 for r in rs], "o-", label=f"{name} fwd+bwd")
        axes[0].loglog(T, [r["fwd_s"] * 1e3 for r in rs], "x--", color=line.get_color(), alpha=0.6, label=f"{name} fwd")
        mem = [(r["T"], r["peak_mem_MiB"]) for r in rs if r["peak_mem_MiB"]]
        if mem:
            axes[1].loglog(*zip(*mem), "o-", color=line.get_color(), label=name)
    axes[0].set(xlabel="T (time steps)", ylabel="time (ms)", title="time vs T")
    axes[1].set(xlabel="T (time steps)", ylabel="peak extra memory, fwd+bwd (MiB)", title="memory vs T")
    for ax in axes:
        ax.set_xticks(Ts, [str(t) for t in Ts])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--T", type=ints, default=[1024, 2048, 4096, 8192, 16384], help="sequence lengths")
    p.add_argument("--B", type=int, default=1, help="batch size")
    p.add_argument("--C", type=int, default=256, help="channels (neurons)")
    p.add_argument("--neurons", default=",".join(NEURONS))
    p.add_argument("--lif-max-T", type=int, default=2048,
                   help="run LIF only up to this T (a serial loop whose backward grows as T^2 here)")
    p.add_argument("--dsn-backend", default="auto", choices=DSN_BACKENDS, help="ops.dsn backend of the DSN rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="best of this many timed runs")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default benchmarks/results/bench_neurons_<device>.json; the PNG sits beside it)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [n for n in args.neurons.split(",") if n]
    unknown = [n for n in names if n not in NEURONS]
    if unknown:  # checked before any timing, so a typo never runs (and reports) the wrong neuron
        p.error(f"--neurons: unknown {', '.join(unknown)}; choose from {', '.join(NEURONS)}")
    load_before = os.getloadavg()
    B, C = args.B, args.C
    rows = []
    header = (f"{'neuron':>12} {'T':>6} | {'fwd ms':>9} {'cpu ms':>9} | {'fwd+bwd ms':>10} {'cpu ms':>10} |"
              f" {'peak MiB':>8}")
    print(f"B={B} C={C} {device} threads={args.threads} load {load_before}\n{header}\n" + "-" * len(header))
    for T in args.T:
        gen = torch.Generator().manual_seed(0)
        x0 = torch.randn(B, T, C, generator=gen).to(device)
        grad = torch.randn(B, T, C, generator=gen).to(device)
        for name in names:
            if name == "LIF" and T > args.lif_max_T:
                continue
            torch.manual_seed(0)
            neuron = build(name, C, T, args.dsn_backend).to(device)
            x = x0.clone().requires_grad_()
            with torch.no_grad(), record_backends() as ran:
                neuron(x[:, :8])
            backend = ran[0][1] if ran else None

            def fwd():
                return neuron(x)

            def fwd_bwd():
                x.grad = None
                neuron.zero_grad(set_to_none=True)
                neuron(x).backward(grad)

            t_fwd, c_fwd = best_time(fwd, device, args.warmup, args.repeat, slow_s=5.0)
            t_fb, c_fb = best_time(fwd_bwd, device, args.warmup, args.repeat, slow_s=5.0)
            mem = peak_extra_memory(fwd_bwd, device)
            row = dict(neuron=name, backend=backend, B=B, C=C, T=T, fwd_s=t_fwd, fwd_bwd_s=t_fb, fwd_cpu_s=c_fwd, fwd_bwd_cpu_s=c_fb,
                       peak_mem_MiB=None if mem is None else mem / 2**20)
            rows.append(row)
            mem_s = "n/a" if mem is None else f"{mem / 2**20:8.1f}"
            label = f"{name}[{backend}]" if backend else name
            print(f"{label:>12} {T:>6} | {1e3 * t_fwd:>9.2f} {1e3 * c_fwd:>9.2f} | {1e3 * t_fb:>10.2f} {1e3 * c_fb:>10.2f} |"
                  f" {mem_s:>8}", flush=True)
            del neuron, x

    load_after = os.getloadavg()
    T_max = max(args.T)
    at = {r["neuron"]: r for r in rows if r["T"] == T_max}
    ratios = {}
    if "DSN" in at:
        for other in ("PSN", "SlidingPSN", "LIF"):
            if other in at:
                ratios[f"{other}/DSN"] = {k: at[other][k] / at["DSN"][k]
                                          for k in ("fwd_s", "fwd_bwd_s", "fwd_cpu_s", "fwd_bwd_cpu_s")}
    print(f"\nspeed-up of DSN at T={T_max} (other neuron's time / DSN's time):")
    for k, v in ratios.items():
        print(f"  {k:>15}: fwd {v['fwd_s']:7.1f}x   fwd+bwd {v['fwd_bwd_s']:7.1f}x   (CPU time: fwd {v['fwd_cpu_s']:.1f}x,"
              f" fwd+bwd {v['fwd_bwd_cpu_s']:.1f}x)")
    print(f"load average before {load_before}, after {load_after}")

    out = args.out or Path(__file__).resolve().parent / "results" / f"bench_neurons_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = dict(benchmark="bench_neurons", command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                  machine=machine_info(device), device=str(device), dtype="float32", B=B, C=C,
                  loadavg=dict(before=load_before, after=load_after),
                  timing=dict(warmup=args.warmup, repeat=args.repeat, statistic="min", forward="autograd recording"),
                  memory="peak extra RSS (VmHWM) over one fwd+bwd" if device.type == "cpu" else "max_memory_allocated",
                  rows=rows, speedup_of_DSN_at_T_max=dict(T=T_max, **ratios))
    out.write_text(json.dumps(result, indent=1) + "\n")
    png = out.with_suffix(".png")
    try:
        plot(rows, args.T, png)
        print(f"wrote {out} and {png}")
    except ImportError:
        print(f"wrote {out} (no matplotlib: no PNG)")


if __name__ == "__main__":
    main()
