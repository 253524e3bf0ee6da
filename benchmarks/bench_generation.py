"""Generation speed and memory against generated length: SpikeLM vs Mamba vs Llama (KV cache), CPU.

Each model (random weights, about the same parameter count) is primed with a short prompt and then
decodes greedily one token at a time through its own cache, up to --max-tokens. We record the
per-token latency of every step, the process RSS and the cache size at each checkpoint length.

    python benchmarks/bench_generation.py                      # 1k..32k tokens, ~12M-param models
    python benchmarks/bench_generation.py --max-tokens 4096    # quicker

Writes benchmarks/results/bench_generation.json and .png.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from datetime import datetime, timezone

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.models import CACHE_NAME

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_models(vocab: int, hidden: int, layers: int, window: int):
    spikelm = SpikeLMForCausalLM(SpikeLMConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                               num_attention_heads=max(1, hidden // 64), attention_window=window))
    n = sum(p.numel() for p in spikelm.parameters())
    # widen the baselines' MLP/expansion until their size matches SpikeLM's within a few percent
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                                         intermediate_size=_match(n, lambda m: _count(LlamaForCausalLM, LlamaConfig(
                                             vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                             num_attention_heads=max(1, hidden // 64), intermediate_size=m,
                                             tie_word_embeddings=True)), lo=hidden, hi=16 * hidden),
                                         max_position_embeddings=65536, tie_word_embeddings=True))
    mamba_layers = _match(n, lambda L: _count(MambaForCausalLM, MambaConfig(vocab_size=vocab, hidden_size=hidden,
                                                                            num_hidden_layers=L)), lo=1, hi=8 * layers)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=mamba_layers))
    compiled = SpikeLMForCausalLM(spikelm.config)
    compiled.load_state_dict(spikelm.state_dict())
    compiled.compile_decoding()  # the same weights, decoding steps through torch.compile (Inductor)
    return {"spikelm": spikelm.eval(), "spikelm_compiled": compiled.eval(), "mamba": mamba.eval(), "llama": llama.eval()}


def _count(cls, config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cls(config).parameters())


def _match(target: int, size_of, lo: int, hi: int) -> int:
    """Smallest integer knob in [lo, hi] whose model is at least target parameters (bisection)."""
    while lo < hi:
        mid = (lo + hi) // 2
        if size_of(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return cache.nbytes()
    seen, total = set(), 0
    stack = [cache]
    while stack:  # walk any cache object for its tensors
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            if obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total


@torch.no_grad()
def decode(model, prompt: torch.Tensor, n_tokens: int, checkpoints: list[int]):
    proc = psutil.Process()
    out = model(prompt, use_cache=True)
    cache = out[CACHE_NAME]
    token = out.logits[:, -1:].argmax(-1)
    latencies, cpu_times, marks = [], [], {}
    for i in range(1, n_tokens + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(token, use_cache=True, **{CACHE_NAME: cache})
        cache = out[CACHE_NAME]
        token = out.logits[:, -1:].argmax(-1)
        latencies.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if i in checkpoints:
            marks[i] = {"rss_mb": proc.memory_info().rss / 2**20, "cache_mb": _cache_bytes(cache) / 2**20,
                        "tokens_per_s": i / sum(latencies), "tokens_per_cpu_s": i / sum(cpu_times)}
    return latencies, cpu_times, marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--window", type=int, default=512, help="SpikeLM attention window")
    parser.add_argument("--models", default="spikelm,spikelm_compiled,mamba,llama")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="per-token time from process CPU time (robust on a shared machine) or wall time")
    parser.add_argument("--out", default=os.path.join(RESULTS, "bench_generation"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    checkpoints = [n for n in (1024, 2048, 4096, 8192, 16384, 32768) if n <= args.max_tokens]
    models = build_models(args.vocab, args.hidden, args.layers, args.window)
    prompt = torch.randint(0, args.vocab, (1, 16))
    load_before = os.getloadavg()
    results = {}
    for name in args.models.split(","):
        model = models[name]
        params = sum(p.numel() for p in model.parameters())
        gc.collect()
        t0 = time.perf_counter()
        # warm-up, not timed below: for the compiled model its compilations, the last of which comes
        # when the attention blocks' KV caches reach the window
        decode(model, prompt, args.window + 32, [])
        warmup_s = time.perf_counter() - t0
        latencies, cpu_times, marks = decode(model, prompt, args.max_tokens, checkpoints)
        # on a shared machine wall time measures the neighbours too: with one thread, process CPU
        # time per token is the model's own cost
        series = cpu_times if args.clock == "cpu" else latencies
        first = sum(series[:1024]) / min(1024, len(series))
        last = sum(series[-1024:]) / min(1024, len(series))
        results[name] = {"params": params, "warmup_s": warmup_s, "checkpoints": marks, "first_1k_ms": first * 1e3, "last_1k_ms": last * 1e3,
                         "latency_ms_per_1k": [sum(series[i:i + 1024]) / len(series[i:i + 1024]) * 1e3
                                               for i in range(0, len(series), 1024)]}
        print(f"{name}: {params / 1e6:.1f}M params, first 1k {first * 1e3:.2f} ms/token, last 1k {last * 1e3:.2f} ms/token")
        del model
        models[name] = None

    c0, cN = checkpoints[0], checkpoints[-1]
    print(f"\n{'model':<17}{'params':>9}{'tok/s@1k':>10}{'tok/s@8k':>10}{'tok/s@end':>10}{'RSS growth':>12}"
          f"{'cache@1k MB':>12}{'cache@end MB':>13}{'last/first 1k':>15}")
    for name, r in results.items():
        m = r["checkpoints"]
        growth = (m[cN]["rss_mb"] - m[c0]["rss_mb"]) / m[c0]["rss_mb"] * 100
        r["rss_growth_pct"] = growth
        r["latency_ratio_last_first"] = r["last_1k_ms"] / r["first_1k_ms"]
        rate = "tokens_per_cpu_s" if args.clock == "cpu" else "tokens_per_s"
        at8k = m.get(8192, m[cN])[rate]
        print(f"{name:<17}{r['params'] / 1e6:>8.1f}M{m[c0][rate]:>10.1f}{at8k:>10.1f}{m[cN][rate]:>10.1f}"
              f"{growth:>11.2f}%{m[c0]['cache_mb']:>12.2f}{m[cN]['cache_mb']:>13.2f}{r['latency_ratio_last_first']:>15.2f}")

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "args": vars(args)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for name, r in results.items():
            xs = [(i + 1) * 1024 for i in range(len(r["latency_ms_per_1k"]))]
            ax1.plot(xs, r["latency_ms_per_1k"], label=name)
            ax2.plot(checkpoints, [r["checkpoints"][c]["cache_mb"] for c in checkpoints], marker="o", label=name)
        ax1.set(xlabel="generated tokens", ylabel="ms / token (mean over 1k)", title="per-token latency")
        ax2.set(xlabel="generated tokens", ylabel="cache MB", title="generation cache size", xscale="log")
        ax1.legend(), ax2.legend()
        fig.tight_layout()
        fig.savefig(args.out + ".png", dpi=120)
    except ImportError:
        print("matplotlib not installed: no PNG")
    print(f"wrote {args.out}.json")


if __name__ == "__main__":
    main()
