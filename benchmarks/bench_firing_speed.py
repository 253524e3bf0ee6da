"""What the firing loss buys at decoding time: validation perplexity against decode tokens/s, dense and spike-sparse.

For each trained run (train.py output folders, e.g. configs/tiny.yaml trained with --firing_loss_coef
0, 0.1, 0.3): the validation perplexity (the run's own held-out documents, windows of its training
length, as `evaluate.py ppl`), the input density of its spike-fed linears and the bytes of weights
a decoding step reads (spikelm.eval.sparsity, measured on the dense eager decode), and the decode
speed of the bench_generation rows: dense eager, dense compiled, sparse eager and sparse compiled
(set_sparse_inference(--sparse-mode)), greedy from a prompt of validation text, with the
agreement of every row's tokens with the dense eager row's.

    python benchmarks/bench_firing_speed.py --runs runs/tiny_fl0 runs/tiny_fl0.1 runs/tiny_fl0.3 --threads 1

Writes results/bench_firing_speed.json and .png (perplexity against tokens/s, one point per run and row).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_generation import SPIKELM_ROWS, decode, spikelm_row  # noqa: E402
from export_validation_text import main as export_validation_text  # noqa: E402
from spikelm.eval import perplexity, token_nll  # noqa: E402
from spikelm.eval.loading import load_model, training_length  # noqa: E402
from spikelm.eval.sparsity import SpikeDensityMonitor  # noqa: E402


def validation_ids(run: Path, tokenizer) -> torch.Tensor:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "validation.txt"
        if export_validation_text(["--run", str(run), "--out", str(out)]) != 0:
            raise SystemExit(f"{run}: could not rebuild its validation text")
        text = out.read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def validation_perplexity(model, ids: torch.Tensor, context: int, max_tokens: int) -> float:
    ids = ids[:max_tokens]
    # consecutive windows share one token: every token after the first is scored once (as evaluate.py ppl)
    windows = [ids[s:s + context] for s in range(0, ids.numel() - 1, context - 1)]
    return perplexity(torch.cat([token_nll(model, w) for w in windows if w.numel() > 1]))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, help="train.py output folders (model, tokenizer, run_config)")
    p.add_argument("--rows", default="spikelm,spikelm_compiled,spikelm_sparse,spikelm_sparse_compiled")
    p.add_argument("--sparse-mode", choices=("auto", "on"), default="auto")
    p.add_argument("--tokens", type=int, default=1024, help="timed decoding steps per row")
    p.add_argument("--warmup-tokens", type=int, default=64, help="untimed steps first (the compiles)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--ppl-tokens", type=int, default=16384, help="validation tokens scored (at most)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "bench_firing_speed"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    rows = args.rows.split(",")
    load_before = os.getloadavg()
    results = []
    for run in map(Path, args.runs):
        base, tokenizer = load_model(run, "cpu")
        ids = validation_ids(run, tokenizer)
        context = training_length(run) or 512
        ppl = validation_perplexity(base, ids, context, args.ppl_tokens)
        prompt = ids[None, : args.prompt_tokens]
        entry = {"run": str(run), "firing_loss_coef": base.config.firing_loss_coef, "params":
                 sum(q.numel() for q in base.parameters()), "val_ppl": ppl, "ppl_tokens": min(ids.numel(),
                                                                                              args.ppl_tokens),
                 "context": context, "rows": {}}
        tokens = {}
        for name in rows:
            model = spikelm_row(base, name, args.sparse_mode)
            monitor = None
            if name == "spikelm":
                with SpikeDensityMonitor(model) as monitor:
                    decode(model, prompt, args.tokens, [])
            t0 = time.perf_counter()
            decode(model, prompt, args.warmup_tokens, [])
            warmup_s = time.perf_counter() - t0
            _, cpu, _, tokens[name] = decode(model, prompt, args.tokens, [])
            entry["rows"][name] = {"sparse_mode": model.lm_head.sparse_mode, "tokens_per_cpu_s": len(cpu) / sum(cpu),
                                   "warmup_s": warmup_s}
            if monitor is not None:
                entry["spike_density"] = monitor.report()
            print(f"{run.name} {name}: {entry['rows'][name]['tokens_per_cpu_s']:.1f} tok/s", flush=True)
            del model
        for name, toks in tokens.items():
            if "spikelm" in tokens:
                entry["rows"][name]["same_tokens_as_dense_eager"] = toks == tokens["spikelm"]
        if "spike_density" in entry:
            total = entry["spike_density"]["total"]
            for name, r in entry["rows"].items():
                key = {"off": "dense", "on": "sparse", "auto": "auto"}[r["sparse_mode"]]
                r["weight_bytes_per_token"] = total[f"{key}_bytes_per_token"]
        results.append(entry)

    print(f"\n{'run':<16}{'coef':>6}{'val ppl':>9}{'density':>9}" + "".join(f"{n:>26}" for n in rows))
    for e in results:
        dens = e.get("spike_density", {}).get("mean_density", float("nan"))
        print(f"{Path(e['run']).name:<16}{e['firing_loss_coef']:>6}{e['val_ppl']:>9.2f}{dens:>9.3f}"
              + "".join(f"{e['rows'][n]['tokens_per_cpu_s']:>16.1f} tok/s"
                        f"{' same' if e['rows'][n].get('same_tokens_as_dense_eager', True) else ' DIFF':>5}"
                        for n in rows))
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor()
            or platform.machine(), "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "args": vars(args),
            "command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "clock": "process CPU time per token (one thread)"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out + ".json.tmp", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    os.replace(args.out + ".json.tmp", args.out + ".json")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG")
    else:
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for name in rows:
            xs = [e["rows"][name]["tokens_per_cpu_s"] for e in results]
            ys = [e["val_ppl"] for e in results]
            ax.plot(xs, ys, marker="o", label=name)
            for e, x, y in zip(results, xs, ys):
                ax.annotate(f"c={e['firing_loss_coef']}", (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=8)
        ax.set(xlabel="decode tokens / CPU second (1 thread)", ylabel="validation perplexity",
               title="firing loss: perplexity against decoding speed")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=120)
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
