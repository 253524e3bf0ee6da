"""Training throughput (tokens/s of forward + backward + AdamW step) on this CPU: SpikeLM against
transformers' LlamaForCausalLM and MambaForCausalLM of the same parameter count (random weights).

Every step trains on about the same number of tokens (--tokens, default 2048): batch =
max(1, tokens / block), so block 128 runs 16 rows, 512 4 rows, 2k 1 row, 8k 1 row (8192 tokens).
Defaults are one timed step without warmup (this CPU is slow and often shared); raise
--steps/--warmup on a quiet machine: the best step is reported. SpikeLM has the shape of
configs/small.yaml (~19M parameters). Two Llamas of its parameter count (benchmarks/fair_llama.py):
`llama` of standard proportions (MLP 8/3 x hidden, depth matched: deeper than SpikeLM) and
`llama_same_depth` (SpikeLM's 8 layers, MLP widened); Mamba's depth matches the count.

    python benchmarks/bench_training.py                     # blocks 128, 2048, 8192; all four models
    python benchmarks/bench_training.py --blocks 512 --models spikelm llama --steps 2

Prints a table and writes benchmarks/results/bench_training.json (machine, threads, load average
before and after each measurement: this machine may be shared, so read the numbers with it).
Issue 5's goals: at least Llama's throughput at 2k, and 3x Llama's at 8k.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from timing import Stopwatch  # noqa: E402

from spikelm.training import adamw  # noqa: E402

VOCAB, HIDDEN = 8192, 384


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def spikelm_config():
    from spikelm import SpikeLMConfig
    return SpikeLMConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=8, num_attention_heads=6,
                         attention_window=512)


def spikelm_model(block: int):
    from spikelm import SpikeLMForCausalLM
    return SpikeLMForCausalLM(spikelm_config())


def llama_model(shape: str):
    from transformers import LlamaForCausalLM

    from fair_llama import matched_llama_config, spikelm_parameters
    cfg = spikelm_config()
    return LlamaForCausalLM(matched_llama_config(spikelm_parameters(cfg), VOCAB, HIDDEN, shape, cfg.num_hidden_layers))


def mamba_model(layers: int):
    from transformers import MambaConfig, MambaForCausalLM
    cfg = MambaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, state_size=16, expand=2,
                      tie_word_embeddings=True)
    return MambaForCausalLM(cfg)


def matched_layers(build, target: int, lo: int = 1, hi: int = 64) -> int:
    """The depth whose parameter count is closest to target (built on the meta device: no memory)."""
    best, best_d = lo, None
    with torch.device("meta"):
        for n in range(lo, hi + 1):
            d = abs(n_params(build(n)) - target)
            if best_d is None or d < best_d:
                best, best_d = n, d
            elif d > best_d:
                break
    return best


def time_steps(model, block: int, tokens: int, steps: int, warmup: int, budget_s: float) -> dict:
    batch = max(1, tokens // block)
    model.train()
    opt = adamw([{"params": list(model.parameters())}], lr=1e-4)  # train.py's optimizer (fused where it can be)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (batch, block), generator=g)
    times = []
    t_all = time.perf_counter()
    for i in range(warmup + steps):
        with Stopwatch() as sw:
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        dt = sw.wall
        if i >= warmup:
            times.append(dt)
        elif time.perf_counter() - t_all > budget_s:  # too slow to warm up and still time it: keep this step
            times.append(dt)
            break
        if times and time.perf_counter() - t_all > budget_s:
            break
    best = min(times)
    return {"batch": batch, "block": block, "tokens_per_step": batch * block, "step_s": times,
            "best_step_s": best, "tokens_per_s": batch * block / best, "warm": len(times) > 0 and warmup > 0
            and len(times) <= steps, "loss": float(loss.detach())}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", default="128,2048,8192")
    p.add_argument("--models", nargs="+", default=["spikelm", "llama", "llama_same_depth", "mamba"])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per training step (batch = tokens / block)")
    p.add_argument("--steps", type=int, default=1, help="timed steps (the best is reported)")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--budget", type=float, default=240.0, help="seconds per (model, block) at most")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "bench_training.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    blocks = [int(b) for b in args.blocks.split(",")]

    with torch.device("meta"):
        target = n_params(spikelm_model(512))
        depth = {"llama": llama_model("standard").config.num_hidden_layers,
                 "llama_same_depth": llama_model("same_depth").config.num_hidden_layers,
                 "mamba": matched_layers(mamba_model, target)}
    builders = {"spikelm": spikelm_model, "llama": lambda b: llama_model("standard"),
                "llama_same_depth": lambda b: llama_model("same_depth"), "mamba": lambda b: mamba_model(depth["mamba"])}
    results = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": {"platform": platform.platform(), "processor": platform.processor(),
                           "cpu_count": os.cpu_count(), "torch": torch.__version__,
                           "torch_threads": torch.get_num_threads(), "python": platform.python_version()},
               "settings": vars(args) | {"out": str(args.out)}, "parameters": {}, "depth": depth, "runs": []}
    import transformers
    results["machine"]["transformers"] = transformers.__version__
    for block in blocks:  # block-major: a cut-off run still compares every model at the shorter blocks
        for name in args.models:
            gc.collect()
            torch.manual_seed(0)
            model = builders[name](block)
            results["parameters"][name] = n_params(model)
            load0 = os.getloadavg()
            r = time_steps(model, block, args.tokens, args.steps, args.warmup, args.budget)
            r.update(model=name, loadavg_before=load0, loadavg_after=os.getloadavg())
            results["runs"].append(r)
            print(f"{name:8s} block {block:5d} batch {r['batch']:3d}: {r['tokens_per_s']:8.0f} tok/s "
                  f"(best step {r['best_step_s']:.2f}s of {len(r['step_s'])}; load {load0[0]:.1f})", flush=True)
            del model
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))  # partial results survive a cut-off

    # table
    print()
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in results["parameters"].items())
          + " (layers: " + ", ".join(f"{k} {v}" for k, v in depth.items()) + ")")
    refs = [m for m in ("llama", "llama_same_depth") if m in args.models]
    head = "| block | " + " | ".join(f"{m} tok/s" for m in args.models) + "".join(f" | spikelm / {m}" for m in refs) + " |"
    print(head)
    print("|" + "---|" * (len(args.models) + 1 + len(refs)))
    for block in blocks:
        row = {r["model"]: r["tokens_per_s"] for r in results["runs"] if r["block"] == block}
        ratios = [row["spikelm"] / row[m] if "spikelm" in row and m in row else float("nan") for m in refs]
        print(f"| {block} | " + " | ".join(f"{row.get(m, float('nan')):.0f}" for m in args.models)
              + "".join(f" | {r:.2f}x" for r in ratios) + " |")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
