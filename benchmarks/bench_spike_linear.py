"""The event-driven linear op against dense F.linear: time per call by input density, and the crossover.

For each weight shape [out, in] (the spike-fed linears of the tiny, small and paper-137m shapes)
and each input density, one call of spikelm.ops.spike_linear (forced sparse, max_density 1) and one
of F.linear on the same spikes (integers 1..4 at the chosen fraction of inputs, the rest 0), rows =
batch x tokens. Two regimes: "hot" repeats one weight (it stays in cache, as in a model whose
weights fit the L2/L3 caches), "cold" cycles through copies of it totalling --cold-mb (each call
reads its weights from DRAM, as in a model larger than the last-level cache). The crossover is the
density where the two times cross (linear interpolation between measured densities; 0 when dense
is faster everywhere, 1 when sparse is faster everywhere). A least-squares fit of
time = fixed + per-weight x weights-read for each product gives the cost model that
SpikeLinear's "auto" mode uses (spikelm/layers/spike_linear.py).

    python benchmarks/bench_spike_linear.py --threads 1          # -> results/bench_spike_linear.json, .png

Time: CPU time of this process (one thread: robust to a shared machine), best of --repeat rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import machine_info  # noqa: E402
from timing import best_time  # noqa: E402
from spikelm.ops.spike_linear import c_kernel_available, spike_linear  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (out, in) of the spike-fed linears: tiny (hidden 128), small (384), paper-137m (768), and LM heads
SHAPES = [(512, 128), (128, 256), (256, 128), (128, 512), (2048, 128),
          (1536, 384), (384, 768), (1024, 384), (384, 1024), (8192, 384),
          (3072, 768), (768, 1536), (2048, 768), (768, 2048), (32000, 768)]
DENSITIES = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]


def spikes(rows: int, n_in: int, density: float, gen: torch.Generator, dtype) -> torch.Tensor:
    fired = torch.rand(rows, 1, n_in, generator=gen) < density
    return (torch.randint(1, 5, (rows, 1, n_in), generator=gen) * fired).to(dtype)


def time_per_call(fn, weights: list, calls: int, repeat: int) -> float:
    """CPU seconds per call: the best of repeat rounds of `calls` calls cycling through weights (so that,
    with enough weights, each call finds its weight out of cache)."""
    def round_of_calls():
        for i in range(calls):
            fn(weights[i % len(weights)])

    for w in weights[: min(len(weights), 8)]:
        fn(w)
    return best_time(round_of_calls, "cpu", warmup=0, repeat=repeat)[1] / calls


def crossover(densities, dense_s, sparse_s) -> float:
    diff = [s - d for s, d in zip(sparse_s, dense_s)]
    if diff[0] >= 0:
        return 0.0
    for i in range(1, len(diff)):
        if diff[i] >= 0:
            return densities[i - 1] + (densities[i] - densities[i - 1]) * -diff[i - 1] / (diff[i] - diff[i - 1])
    return 1.0


def fit(xs, ys):
    """Theil-Sen line y = a + b x (median of the pairwise slopes, then the median intercept): (a, b). Robust to
    the outliers a shared machine adds to single timings."""
    slopes = sorted((y2 - y1) / (x2 - x1) for i, (x1, y1) in enumerate(zip(xs, ys))
                    for x2, y2 in list(zip(xs, ys))[i + 1:] if x2 != x1)
    b = slopes[len(slopes) // 2] if slopes else 0.0
    icepts = sorted(y - b * x for x, y in zip(xs, ys))
    return icepts[len(icepts) // 2], b


def cost_models(results: list) -> dict:
    """Per (dtype, regime, rows): dense = a + b x in x out, sparse = a + b x fired x out (microseconds, weights)."""
    models = {}
    for key in sorted({(r["dtype"], r["regime"], r["rows"]) for r in results}):
        rs = [r for r in results if (r["dtype"], r["regime"], r["rows"]) == key]
        dense = fit([r["in"] * r["out"] for r in rs for _ in r["densities"]], [t for r in rs for t in r["dense_us"]])
        sparse = fit([f * r["out"] for r in rs for f in r["fired_inputs"]], [t for r in rs for t in r["sparse_us"]])
        models["/".join(map(str, key))] = {"dense_us": dense[0], "dense_ns_per_weight": dense[1] * 1e3,
                                           "sparse_us": sparse[0], "sparse_ns_per_weight": sparse[1] * 1e3}
    return models


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", default=None, help="comma-separated OUTxIN (default: the models' spike-fed linears)")
    p.add_argument("--rows", default="1,4", help="comma-separated batch sizes (rows per call)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--regimes", default="hot,cold")
    p.add_argument("--cold-mb", type=float, default=128.0, help="weights cycled through in the cold regime")
    p.add_argument("--min-call-ms", type=float, default=40.0, help="timed work per round (ms of dense calls)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "bench_spike_linear"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not c_kernel_available():
        sys.exit("the spike_linear C kernel is unavailable here: nothing to measure")
    gen = torch.Generator().manual_seed(0)
    load_before = os.getloadavg()
    rows_list = [int(r) for r in args.rows.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    results = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for regime in args.regimes.split(","):
            for out_f, in_f in shapes:
                nbytes = out_f * in_f * torch.empty((), dtype=dtype).element_size()
                copies = 1 if regime == "hot" else max(2, int(args.cold_mb * 2**20 / nbytes))
                weights = [torch.randn(out_f, in_f, generator=gen).to(dtype) for _ in range(copies)]
                for w in weights:  # the kernel makes its layout of each weight once: on a call outside the timing
                    spike_linear(torch.ones(1, in_f, dtype=dtype), w)
                for rows in rows_list:
                    s0 = spikes(rows, in_f, 0.5, gen, dtype)
                    est = time_per_call(lambda w: F.linear(s0, w), weights, 5, 1)
                    calls = max(len(weights) if regime == "cold" else 1, int(args.min_call_ms * 1e-3 / max(est, 1e-7)))
                    dense_s, sparse_s, fired = [], [], []
                    for d in DENSITIES:
                        s = spikes(rows, in_f, d, gen, dtype)
                        dense_s.append(time_per_call(lambda w: F.linear(s, w), weights, calls, args.repeat))
                        sparse_s.append(time_per_call(lambda w: spike_linear(s, w), weights, calls, args.repeat))
                        fired.append(int((s.reshape(rows, in_f) != 0).any(0).sum()))
                    x = crossover(DENSITIES, dense_s, sparse_s)
                    results.append({"dtype": dtype_name, "regime": regime, "out": out_f, "in": in_f, "rows": rows,
                                    "weight_mb": nbytes / 2**20, "densities": DENSITIES, "fired_inputs": fired,
                                    "dense_us": [t * 1e6 for t in dense_s], "sparse_us": [t * 1e6 for t in sparse_s],
                                    "crossover": x})
                    print(f"{dtype_name:>8} {regime:>4} {out_f:>5}x{in_f:<5} rows {rows}: dense "
                          f"{dense_s[0] * 1e6:7.1f} us, sparse at 0/10/30/100% "
                          + "/".join(f"{sparse_s[DENSITIES.index(d)] * 1e6:.1f}" for d in (0.0, 0.1, 0.3, 1.0))
                          + f" us, crossover {x:.2f}", flush=True)
                del weights
    models = cost_models(results)
    print("\ncost model (us fixed + ns per weight read):")
    for k, m in sorted(models.items()):
        print(f"  {k:<22} dense {m['dense_us']:6.1f} us + {m['dense_ns_per_weight']:.4f} ns/w   "
              f"sparse {m['sparse_us']:6.1f} us + {m['sparse_ns_per_weight']:.4f} ns/w")
    meta = {**machine_info(torch.device("cpu")), "threads": args.threads, "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "clock": "process CPU time, best of --repeat rounds"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump({"meta": meta, "cost_model": models, "results": results}, f, indent=1)
    os.replace(tmp, args.out + ".json")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
    else:
        picks = [r for r in results if r["rows"] == rows_list[0] and r["dtype"] == args.dtypes.split(",")[0]]
        regimes = args.regimes.split(",")
        fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.5), squeeze=False)
        for ax, regime in zip(axes[0], regimes):
            for r in picks:
                if r["regime"] == regime and (r["out"], r["in"]) in ((256, 128), (1536, 384), (3072, 768), (32000, 768)):
                    speed = [d / s for d, s in zip(r["dense_us"], r["sparse_us"])]
                    ax.plot(r["densities"], speed, marker="o", label=f"{r['out']}x{r['in']}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set(xlabel="input density (fraction of inputs that fired)", ylabel="dense time / sparse time",
                   yscale="log", title=f"{regime} weights, rows {rows_list[0]}, {args.dtypes.split(',')[0]}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=120)
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
