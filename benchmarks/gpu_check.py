"""GPU timing for issue 3 (run by benchmarks/gpu_check.sh): fused DSN kernel vs the unfused composition and
the baseline neurons, next to the device's measured copy bandwidth.

Rows, each timed forward (no grad) and forward+backward, best of --repeat after --warmup, at every T:
  dsn_fused    the Triton backend's kernel after the conv (ops/dsn/triton_backend.fused_op(a', X)):
               decay, drive, scan and spikes in one kernel pass
  dsn_unfused  the same math as torch ops around the Triton scan (the paper's design: a generic
               linear-recurrence kernel and separate elementwise ops)
  dsn_module   neurons.DSN (conv included; ops.dsn's "auto" runs the Triton backend on CUDA, checked)
  psn, sliding_psn, lif   neurons.PSN (T x T), neurons.SlidingPSN (k = 4), neurons.LIF (serial loop)
Bandwidth: the fused forward must read a' and X and write S; its GB/s counts exactly those bytes, and
%copy compares with torch's copy_ (read + write bytes) measured the same way. The decode step
(ops.dsn.dsn_step, backend "triton") is timed per token, eager and replayed as one CUDA graph.
--dry-run-cpu checks this script at tiny sizes on the CPU (the Triton cases need TRITON_INTERPRET=1 there).
A time budget (--budget-s) skips the remaining cases rather than overrunning the lent machine.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from spikelm.neurons import DSN, LIF, PSN, SlidingPSN, quantize_spikes  # noqa: E402
from spikelm.ops import log_decay, record_backends, scan, triton_is_available  # noqa: E402
from spikelm.ops.dsn import dsn_step  # noqa: E402
from spikelm.ops import triton_scan  # noqa: E402
from spikelm.ops.dsn.triton_backend import fused_op  # noqa: E402
import timing  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEVICE = "cuda"  # --dry-run-cpu switches to the CPU (torch paths, tiny sizes) to check this script itself


def best_time(fn, warmup, repeat):
    """Best wall seconds of fn() on DEVICE (benchmarks/timing.py: CUDA events on the GPU)."""
    return timing.best_time(fn, DEVICE, warmup, repeat)[0]


def copy_bandwidth(repeat=10):
    """GB/s of a copy between two buffers on DEVICE, bytes read plus bytes written."""
    return timing.copy_bandwidth(DEVICE, 2 << 30 if DEVICE == "cuda" else 1 << 26, repeat)


def make_case(name, B, T, C, dtype):
    """(forward fn, leaves needing grad, bytes the forward must move or None)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = (torch.randn(B, T, C, device=DEVICE, generator=gen) * 2).to(dtype).requires_grad_()
    if name in ("dsn_fused", "dsn_unfused"):
        logit = (torch.randn(B, T, C, device=DEVICE, generator=gen) + 3).to(dtype).requires_grad_()
        if name == "dsn_fused":
            fn = lambda: fused_op(logit, x, None, None, 0.25, 4, 0, 2.0, None)[0]  # noqa: E731
        else:
            fn = lambda: dsn_unfused(logit, x)  # noqa: E731
        moved = B * T * C * (logit.element_size() + 2 * x.element_size())  # read a', X; write S
        return fn, [logit, x], moved
    if name == "dsn_module":
        m = DSN(C).to(DEVICE)
        with torch.no_grad(), record_backends() as ran:
            m(x[:, :2])
        if DEVICE == "cuda" and ran != [("dsn", "triton")]:
            raise RuntimeError(f"DSN on CUDA ran {ran}, not the fused Triton kernel")
    elif name == "psn":
        m = PSN(C, T).to(DEVICE)
    elif name == "sliding_psn":
        m = SlidingPSN(C, k=4).to(DEVICE)
    elif name == "lif":
        m = LIF(C).to(DEVICE)
    else:
        raise ValueError(f"unknown case {name!r}")
    return (lambda: m(x)), [x] + [p for p in m.parameters()], None


def dsn_unfused(logit, x, tau=0.25, max_spike=4):
    """The DSN after its conv as separate torch ops around the Triton scan (the unfused design)."""
    g = log_decay(logit.float(), tau)
    h, _ = scan(-torch.expm1(g) * x.float(), g, backend="triton" if DEVICE == "cuda" else "auto")
    return quantize_spikes(h, max_spike).to(x.dtype)


def tile_rows_sweep(B, T, C, dtype, warmup, repeat, copy_gbps, rows_options=(4, 8, 16)):
    """dsn_fused at one size for several triton_scan.TILE_ROWS (rows of a tile loaded at once)."""
    default, out = triton_scan.TILE_ROWS, []
    try:
        for rows in rows_options:
            triton_scan.TILE_ROWS = rows
            fn, leaves, moved = make_case("dsn_fused", B, T, C, dtype)
            with torch.no_grad():
                t_fwd = best_time(fn, warmup, repeat)
            grad = torch.ones_like(fn())

            def fwd_bwd():
                for leaf in leaves:
                    leaf.grad = None
                fn().backward(grad)

            t_fb = best_time(fwd_bwd, warmup, repeat)
            out.append(dict(tile_rows=rows, T=T, fwd_s=t_fwd, fwd_pct_copy=100 * moved / t_fwd / 1e9 / copy_gbps,
                            fwd_bwd_s=t_fb))
            print(f"  TILE_ROWS={rows:>2}: fwd {1e3 * t_fwd:.3f} ms ({out[-1]['fwd_pct_copy']:.1f}% of copy), "
                  f"fwd+bwd {1e3 * t_fb:.3f} ms", flush=True)
    finally:
        triton_scan.TILE_ROWS = default
    return out


def decode_step_timing(B, C, steps=256):
    """Per-token time of the decode step kernel (dsn_step, backend "triton"), eager and replayed as one CUDA graph
    of `steps` tokens."""
    m = DSN(C).to(DEVICE)
    st = m.initial_state(B, DEVICE, torch.bfloat16)
    xs = torch.randn(steps, B, C, device=DEVICE).bfloat16()
    w, b = m.conv_weight.detach(), m.conv_bias.detach()
    out = torch.empty(steps, B, C, device=DEVICE, dtype=torch.bfloat16)

    def run():
        state = st
        for i in range(steps):
            out[i], state = dsn_step(xs[i], w, b, m.tau, m.max_spike, state=state, backend="triton")

    res = dict(B=B, C=C, steps=steps, eager_per_token_s=best_time(run, 1, 3) / steps)
    if DEVICE == "cuda":
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            run()  # warm up outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            run()
        res["cuda_graph_per_token_s"] = best_time(graph.replay, 1, 3) / steps
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p.add_argument("--T", type=ints, default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--C", type=int, default=1024)
    p.add_argument("--dtypes", default="bf16,fp32")
    p.add_argument("--cases", default="dsn_fused,dsn_unfused,dsn_module,psn,sliding_psn,lif")
    p.add_argument("--lif-max-T", type=int, default=16384, help="LIF is a Python loop of T steps: cap its T")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=270.0, help="skip what is left after this many seconds")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--dry-run-cpu", action="store_true", help="check this script on the CPU at tiny sizes")
    args = p.parse_args(argv)
    global DEVICE
    if args.dry_run_cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("gpu_check.py: no CUDA device")
    t_start = time.time()
    gpu = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu_dry_run"
    info = dict(gpu=gpu, torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                triton_available=triton_is_available(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    try:
        import triton  # noqa: PLC0415

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    print(json.dumps(info))
    copy_before = copy_bandwidth()
    print(f"copy bandwidth: {copy_before:.0f} GB/s (read + write)  B={args.B} C={args.C}", flush=True)

    rows = []
    slug = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_").lower()
    out = args.out or Path(__file__).resolve().parent / "results" / f"gpu_check_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(**more):
        """Rewrite the JSON after every case, so a run cut short by the outer timeout still leaves its rows."""
        result = dict(benchmark="gpu_check", machine=info, B=args.B, C=args.C, complete=False,
                      copy_GBps_read_plus_write=dict(before=copy_before, after=more.pop("copy_after", None)),
                      timing=dict(warmup=args.warmup, repeat=args.repeat, statistic="min",
                                  clock="cuda events" if DEVICE == "cuda" else "perf_counter"),
                      tile_rows_default=triton_scan.TILE_ROWS, rows=rows, wall_s=time.time() - t_start)
        result.update(more)
        out.write_text(json.dumps(result, indent=1) + "\n")

    header = (f"{'case':>12} {'dtype':>5} {'T':>6} | {'fwd ms':>9} {'GB/s':>7} {'%copy':>6} | {'fwd+bwd ms':>10}")
    print(header + "\n" + "-" * len(header), flush=True)
    # longest T first: if the time budget runs out, what is skipped is the short sequences, not the headline
    for T in sorted(args.T, reverse=True):
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            for name in args.cases.split(","):
                row = dict(case=name, dtype=dname, B=args.B, C=args.C, T=T)
                if name == "lif" and T > args.lif_max_T:
                    continue
                if time.time() - t_start > args.budget_s:
                    row["skipped"] = "time budget"
                    rows.append(row)
                    continue
                try:
                    fn, leaves, moved = make_case(name, args.B, T, args.C, dtype)
                    with torch.no_grad():
                        t_fwd = best_time(fn, args.warmup, args.repeat)
                    row["fwd_s"] = t_fwd
                    if moved:
                        row["fwd_GBps"] = moved / t_fwd / 1e9
                        row["fwd_pct_copy"] = 100 * row["fwd_GBps"] / copy_before
                    grad = None

                    def fwd_bwd():
                        nonlocal grad
                        for leaf in leaves:
                            leaf.grad = None
                        out = fn()
                        if grad is None:
                            grad = torch.ones_like(out)
                        out.backward(grad)

                    repeat = 1 if name == "lif" else args.repeat
                    row["fwd_bwd_s"] = best_time(fwd_bwd, args.warmup if name != "lif" else 0, repeat)
                    del fn, leaves, grad
                except Exception as e:  # noqa: BLE001  (an OOM or a failure is recorded, the rest still runs)
                    row["error"] = f"{type(e).__name__}: {e}"[:500]
                    traceback.print_exc()
                if DEVICE == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                save()
                gbps = f"{row['fwd_GBps']:>7.0f} {row['fwd_pct_copy']:>5.1f}%" if "fwd_GBps" in row else " " * 14
                if "fwd_s" in row:
                    fb = f"{1e3 * row['fwd_bwd_s']:>10.3f}" if "fwd_bwd_s" in row else "     error"
                    print(f"{name:>12} {dname:>5} {T:>6} | {1e3 * row['fwd_s']:>9.3f} {gbps} | {fb}", flush=True)
                else:
                    print(f"{name:>12} {dname:>5} {T:>6} | {row.get('error', row.get('skipped'))}", flush=True)

    def get(case, dname, T, key):
        for r in rows:
            if r["case"] == case and r["dtype"] == dname and r["T"] == T and key in r:
                return r[key]
        return None

    summary = {}
    T = max(args.T)
    for dname in args.dtypes.split(","):
        s = {}
        fused_fb, fused_pct = get("dsn_fused", dname, T, "fwd_bwd_s"), get("dsn_fused", dname, T, "fwd_pct_copy")
        module_fb = get("dsn_module", dname, T, "fwd_bwd_s")
        s["fused_fwd_pct_copy"] = fused_pct
        for other in ("psn", "sliding_psn", "dsn_unfused", "lif"):
            t_other = get(other, dname, T, "fwd_bwd_s")
            if t_other and fused_fb:
                s[f"fwd_bwd_speedup_fused_vs_{other}"] = t_other / fused_fb
            if t_other and module_fb:
                s[f"fwd_bwd_speedup_dsn_module_vs_{other}"] = t_other / module_fb
        summary[dname] = s
        print(f"\nT={T} {dname}: " + ", ".join(f"{k}={v:.2f}" for k, v in s.items() if v is not None))
    print("targets (issue 3, H100): fused fwd >= 70% of copy bandwidth; fwd+bwd >= 50x PSN and >= 4x sliding PSN")

    extras = {}
    if time.time() - t_start < args.budget_s + 45:  # small extras, still inside the outer timeout
        try:
            print(f"\ndsn_fused tile rows sweep (bf16, T={T}):")
            extras["tile_rows_sweep"] = tile_rows_sweep(args.B, T, args.C, torch.bfloat16, args.warmup,
                                                        args.repeat, copy_before)
        except Exception as e:  # noqa: BLE001
            extras["tile_rows_sweep_error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()
        try:
            extras["decode_step"] = decode_step_timing(args.B, args.C)
            print("decode step:", json.dumps(extras["decode_step"]))
        except Exception as e:  # noqa: BLE001
            extras["decode_step_error"] = f"{type(e).__name__}: {e}"[:500]
            traceback.print_exc()

    copy_after = copy_bandwidth()
    save(copy_after=copy_after, summary_at_max_T=summary, extras=extras, complete=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
