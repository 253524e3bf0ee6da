"""A 30k-token stream from a model loaded in bfloat16: finite logits, float32 state, speed, memory, drift.

    python benchmarks/bench_long_stream.py --model runs/tiny                  # 30k tokens, both paths
    python benchmarks/bench_long_stream.py --model runs/tiny --tokens 4096 --generate_tokens 0   # quicker

Two paths, each on a model loaded with `from_pretrained(dir, dtype=torch.bfloat16)`:
- StreamingGenerator (sampling, seeded): every step's logits checked finite; tokens/s (wall and
  process CPU time) and the process RSS per bucket of --bucket tokens; the dtype of every kind of
  state tensor at the end (DSN membranes must be float32). The drift against float32: the float32
  model of the same folder reads the same tokens (teacher-forced, in parallel chunks of one bucket
  that carry its cache, which equals its serial steps), and per bucket we record the max and mean
  absolute logit difference and the top-1 agreement. Only the bf16 steps are timed.
- transformers' generate() (greedy, --generate_tokens, min_new_tokens so EOS does not stop it): every
  step's logits checked finite by a logits processor that keeps nothing, tokens/s and RSS per bucket,
  the state dtypes of the cache it returns, and whether its first tokens equal StreamingGenerator's
  greedy tokens.

Writes benchmarks/results/bench_long_stream.json and .png (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import sys
import time
from datetime import datetime, timezone

import torch

from timing import Stopwatch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def state_dtypes(cache) -> dict[str, str]:
    """dtype per kind of state tensor over every layer ("core.membrane", "final.membrane", "kv_k", ...)."""
    out: dict[str, set] = {}
    for name, t in cache.state_dict()[0].items():  # "layers.3.core.membrane", "final.membrane", "positions"
        if name != "positions":
            out.setdefault(re.sub(r"^layers\.\d+\.", "", name), set()).add(str(t.dtype).replace("torch.", ""))
    return {k: "/".join(sorted(v)) for k, v in sorted(out.items())}


def membranes_float32(dtypes: dict[str, str]) -> bool:
    membranes = {k: v for k, v in dtypes.items() if k.endswith("membrane")}
    return bool(membranes) and all(v == "float32" for v in membranes.values())


class _Buckets:
    """Per bucket of tokens: wall and CPU seconds of the timed steps, RSS at the bucket's end."""

    def __init__(self, size: int):
        self.size, self.rows, self.wall, self.cpu, self.n = size, [], 0.0, 0.0, 0

    def add(self, wall: float, cpu: float, **extra) -> None:
        self.wall += wall
        self.cpu += cpu
        self.n += 1
        if self.n == self.size:
            self.close(**extra)

    def close(self, **extra) -> None:
        if self.n:
            self.rows.append({"end": (len(self.rows)) * self.size + self.n, "tokens_per_s": self.n / self.wall,
                              "tokens_per_cpu_s": self.n / max(self.cpu, 1e-9), "rss_mib": rss_mib(), **extra})
        self.wall = self.cpu = 0.0
        self.n = 0


@torch.inference_mode()
def stream(m16, m32, prompt: torch.Tensor, n: int, bucket: int, seed: int) -> dict:
    from spikelm import StreamingGenerator
    from spikelm.models import CACHE_NAME

    gen = StreamingGenerator(m16, None, temperature=1.0, top_k=50, seed=seed, stop_at_eos=False)
    gen.feed_ids(prompt)
    ref_cache = m32(prompt[None].to(torch.long), use_cache=True)[CACHE_NAME]
    V = m16.config.vocab_size
    logits16 = torch.empty(bucket, V, dtype=torch.float32)  # one bucket's bf16 logits, reused
    tokens: list[int] = []
    timing, drift = _Buckets(bucket), []
    nonfinite_steps, it = 0, gen.generate(None)
    for i in range(n):
        with Stopwatch() as sw:
            tokens.append(next(it))
        wall, cpu = sw.wall, sw.cpu
        row = i % bucket
        nonfinite_steps += int(not torch.isfinite(gen.logits).all())
        logits16[row] = gen.logits.float()
        if row == bucket - 1 or i == n - 1:
            k = row + 1
            out = m32(torch.tensor(tokens[-k:])[None], use_cache=True, **{CACHE_NAME: ref_cache})
            ref_cache = out[CACHE_NAME]
            l32, l16 = out.logits[0].float(), logits16[:k]
            d = (l16 - l32).abs()
            drift.append({"start": i + 1 - k, "end": i + 1, "max_abs_diff": float(d.max()),
                          "mean_abs_diff": float(d.mean()), "mean_abs_logit_fp32": float(l32.abs().mean()),
                          "top1_agreement": float((l16.argmax(-1) == l32.argmax(-1)).float().mean())})
        timing.add(wall, cpu)
    timing.close()
    dtypes = state_dtypes(gen.cache)
    return {"tokens": n, "nonfinite_steps": nonfinite_steps, "state_dtypes": dtypes,
            "membranes_float32": membranes_float32(dtypes), "state_bytes": gen.state_nbytes(),
            "buckets": timing.rows, "drift": drift, "tokens_generated": tokens}


def greedy_stream_tokens(m16, prompt: torch.Tensor, n: int) -> list[int]:
    from spikelm import StreamingGenerator

    gen = StreamingGenerator(m16, None, temperature=0, stop_at_eos=False)
    gen.feed_ids(prompt)
    return list(gen.generate(n))


@torch.inference_mode()
def hf_generate(m16, prompt: torch.Tensor, n: int, bucket: int) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    from spikelm.models import CACHE_NAME

    timing = _Buckets(bucket)

    class Watch(LogitsProcessor):
        """Checks each step's logits and times the step (from the previous call); keeps nothing else."""

        def __init__(self):
            self.nonfinite, self.last = 0, None

        def __call__(self, input_ids, scores):
            # -inf is min_new_tokens masking EOS (processors before this one); NaN or +inf would be the model's
            masked = int(torch.isneginf(scores).sum())
            self.nonfinite += int(bool(torch.isnan(scores).any() or torch.isposinf(scores).any()) or masked > n_eos)
            now = (time.perf_counter(), time.process_time())
            if self.last is not None:
                timing.add(now[0] - self.last[0], now[1] - self.last[1])
            self.last = now
            return scores

    eos = m16.generation_config.eos_token_id
    n_eos = len(eos) if isinstance(eos, list) else int(eos is not None)
    watch = Watch()
    t0 = time.perf_counter()
    out = m16.generate(prompt[None], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       logits_processor=LogitsProcessorList([watch]), return_dict_in_generate=True)
    seconds = time.perf_counter() - t0
    timing.close()
    cache = out[CACHE_NAME] if CACHE_NAME in out else out.get("past_key_values")
    dtypes = state_dtypes(cache) if cache is not None else {}
    return {"tokens": int(out.sequences.shape[1] - prompt.numel()), "seconds": seconds,
            "tokens_per_s": n / seconds, "nonfinite_steps": watch.nonfinite, "state_dtypes": dtypes,
            "membranes_float32": membranes_float32(dtypes), "buckets": timing.rows,
            "sequence": out.sequences[0, prompt.numel():].tolist()}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["streaming"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ends = [d["end"] for d in s["drift"]]
    ax = axes[0]
    ax.plot(ends, [d["mean_abs_diff"] for d in s["drift"]], marker="o", label="mean |bf16 - fp32|")
    ax.plot(ends, [d["max_abs_diff"] for d in s["drift"]], marker=".", label="max |bf16 - fp32|")
    ax.plot(ends, [d["mean_abs_logit_fp32"] for d in s["drift"]], ls="--", label="mean |fp32 logit|")
    ax.set(xlabel="tokens streamed", ylabel="logit", title="bf16 logit drift against float32", yscale="log")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(ends, [d["top1_agreement"] for d in s["drift"]], marker="o")
    ax.set(xlabel="tokens streamed", ylabel="top-1 agreement", title="bf16 vs float32 argmax", ylim=(0, 1.02))
    ax = axes[2]
    for name, r in (("StreamingGenerator", s), ("generate()", result.get("generate"))):
        if r and r["buckets"]:
            ax.plot([b["end"] for b in r["buckets"]], [b["rss_mib"] for b in r["buckets"]], marker=".", label=name)
    ax.set(xlabel="tokens", ylabel="process RSS (MiB)", title="memory over the stream (bf16)")
    ax.legend(fontsize=8)
    fig.suptitle(f"{result['meta']['model']}: {s['tokens']} tokens in bfloat16")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="a saved SpikeLM folder (e.g. train.py's output)")
    p.add_argument("--tokens", type=int, default=30000, help="tokens StreamingGenerator streams")
    p.add_argument("--generate_tokens", type=int, default=30000, help="tokens for generate() (0: skip it)")
    p.add_argument("--bucket", type=int, default=1000, help="tokens per row of the tables")
    p.add_argument("--prompt_tokens", type=int, default=16, help="prompt: the first ids of the model's text, or these")
    p.add_argument("--prompt", default="Of Man's first disobedience, and the fruit", help="prompt text")
    p.add_argument("--check_tokens", type=int, default=1000,
                   help="generate()'s first tokens compared with StreamingGenerator's greedy tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(RESULTS, "bench_long_stream"), help="path without extension")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import spikelm  # noqa: F401  (registers the Auto classes)

    hf_logging.disable_progress_bar()
    load_before = os.getloadavg()
    m16 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    m32 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    assert {q.dtype for q in m16.parameters()} == {torch.bfloat16}
    try:
        tok = AutoTokenizer.from_pretrained(args.model)
        prompt = torch.tensor(tok(args.prompt, add_special_tokens=False)["input_ids"])
    except (OSError, ValueError):
        prompt = torch.arange(1, 1 + args.prompt_tokens)
    rss0 = rss_mib()
    t0 = time.perf_counter()
    s = stream(m16, m32, prompt, args.tokens, args.bucket, args.seed)
    s["seconds"] = time.perf_counter() - t0
    s.pop("tokens_generated")
    result = {"meta": {"command": "python benchmarks/bench_long_stream.py " + shlex.join(sys.argv[1:] if argv is None
                                                                                         else argv),
                       "model": args.model, "parameters": sum(q.numel() for q in m16.parameters()),
                       "config": {k: getattr(m16.config, k) for k in ("hidden_size", "num_hidden_layers", "block_types",
                                                                     "neuron_type", "attention_window", "vocab_size")},
                       "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                       "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
                       "loadavg_before": load_before, "rss_mib_after_loading": rss0, "prompt_tokens": prompt.numel()},
              "streaming": s}
    _print_stream(s)
    if args.generate_tokens:
        g = hf_generate(m16, prompt, args.generate_tokens, args.bucket)
        k = min(args.check_tokens, args.generate_tokens)
        g["first_tokens_equal_streaming_greedy"] = {"tokens": k, "equal": greedy_stream_tokens(m16, prompt, k) ==
                                                    g["sequence"][:k]}
        g.pop("sequence")
        result["generate"] = g
        print(f"\ngenerate(): {g['tokens']} tokens in {g['seconds']:.0f} s ({g['tokens_per_s']:.1f} tokens/s), "
              f"non-finite steps {g['nonfinite_steps']}, membranes float32: {g['membranes_float32']}, first {k} "
              f"greedy tokens equal StreamingGenerator's: {g['first_tokens_equal_streaming_greedy']['equal']}, "
              f"RSS {g['buckets'][0]['rss_mib']:.0f} -> {g['buckets'][-1]['rss_mib']:.0f} MiB")
    result["meta"]["loadavg_after"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    try:
        plot(result, args.out + ".png")
    except ImportError:
        print("matplotlib not installed: no PNG")
    print(f"wrote {args.out}.json")
    return 0


def _print_stream(s: dict) -> None:
    print(f"StreamingGenerator, bf16: {s['tokens']} tokens in {s['seconds']:.0f} s, non-finite steps "
          f"{s['nonfinite_steps']}, membranes float32: {s['membranes_float32']}, state {s['state_bytes'] / 1024:.1f} KiB")
    print(f"state dtypes: {s['state_dtypes']}")
    print(f"\n{'tokens':>8}{'tok/s':>8}{'tok/cpu-s':>11}{'RSS MiB':>9}{'max|d|':>9}{'mean|d|':>9}{'mean|l32|':>10}"
          f"{'top-1 agree':>12}")
    for b, d in zip(s["buckets"], s["drift"]):
        print(f"{b['end']:>8}{b['tokens_per_s']:>8.1f}{b['tokens_per_cpu_s']:>11.1f}{b['rss_mib']:>9.1f}"
              f"{d['max_abs_diff']:>9.3f}{d['mean_abs_diff']:>9.4f}{d['mean_abs_logit_fp32']:>10.3f}"
              f"{d['top1_agreement']:>12.3f}")


if __name__ == "__main__":
    sys.exit(main())
