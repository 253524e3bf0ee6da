"""Generation speed and memory against generated length: SpikeLM (dense and spike-sparse) vs Mamba vs Llama, CPU.

Each model is primed with a prompt and then decodes greedily one token at a time through its own
cache, up to --max-tokens. We record the per-token latency of every step, the process RSS and the
cache size at each checkpoint length, and the bytes of weights each step reads.

SpikeLM rows: `spikelm` (dense, eager), `spikelm_compiled` (dense, compile_decoding()),
`spikelm_sparse` and `spikelm_sparse_compiled` (set_sparse_inference(--sparse-mode), default "auto":
the event-driven product where the measured density makes it pay), `spikelm_sparse_int8` and
`spikelm_sparse_int8_compiled` (the same, its sparse product reading int8 weights with one scale per
output feature: a quantised model, so its tokens may differ from dense; `evaluate.py ppl --sparse on --int8` gives
its perplexity). Every SpikeLM row decodes the same weights from the same prompt, and the JSON
records whether its greedy tokens equal the dense eager row's. Bytes of weights read per token: for SpikeLM, from the spike density of the
spike-fed linears measured on the dense eager row's first --density-tokens steps (spikelm.eval.
sparsity: dense in x out, sparse fired x out, per layer); for Llama and Mamba, every nn.Linear
weight (the dense read).

The SpikeLM model: random weights of a given shape (--vocab/--hidden/--layers, or --config YAML,
e.g. configs/paper-137m.yaml), or a trained model (--model DIR, with --prompt-file giving real text
for the prompt); Llama and Mamba get random weights and about the same parameter count.

Rows run one after another (the default: each row's RSS growth is its own) or, with
--interleave N, in turns of N tokens each, every model alive: a change in the machine's speed during
the run then reaches every row alike, so their ratios (sparse against dense compiled, say) compare
within the run, and each row's speed-up over `spikelm_compiled` is also taken turn by turn (the median
over turns, robust to drift between turns); the checkpoints' rss_mb is then the whole process's. Op calls per token count the
decoding steps, not the prompt's prefill.

    python benchmarks/bench_generation.py                      # 1k..32k tokens, ~12M-param models
    python benchmarks/bench_generation.py --max-tokens 4096    # quicker
    python benchmarks/bench_generation.py --config configs/paper-137m.yaml --max-tokens 1024 \
        --models spikelm,spikelm_compiled,spikelm_sparse,spikelm_sparse_compiled,llama,mamba --out results/x
    python benchmarks/bench_generation.py --model runs/tiny --prompt-file val.txt --models spikelm,spikelm_sparse
    python benchmarks/bench_generation.py --model runs/tiny --prompt-file val.txt --interleave 128 \
        --models spikelm,spikelm_compiled,spikelm_sparse_compiled --max-tokens 2048

Writes benchmarks/results/bench_generation.json and .png (or --out).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
from datetime import datetime, timezone

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from spikelm import SpikeLMConfig, SpikeLMForCausalLM
from spikelm.eval.sparsity import SpikeDensityMonitor
from spikelm.models import CACHE_NAME
from spikelm.ops.spike_linear import kernel_calls, kernel_calls_since, layouts_nbytes
from timing import Stopwatch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# row -> (sparse mode, None: --sparse-mode; compiled; int8)
SPIKELM_ROWS = {"spikelm": ("off", False, False), "spikelm_compiled": ("off", True, False),
                "spikelm_sparse": (None, False, False), "spikelm_sparse_compiled": (None, True, False),
                "spikelm_sparse_int8": (None, False, True), "spikelm_sparse_int8_compiled": (None, True, True)}


def spikelm_config(args) -> SpikeLMConfig:
    """The SpikeLM shape: from --config (a train.py YAML's model keys) or --vocab/--hidden/--layers/--window."""
    if args.config:
        from spikelm.training.args import load_yaml, model_keys

        data = load_yaml(args.config)
        return SpikeLMConfig(vocab_size=data.get("vocab_size", args.vocab),
                             **{k: v for k, v in data.items() if k in model_keys()})
    return SpikeLMConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=max(1, args.hidden // 64), attention_window=args.window)


def spikelm_row(spikelm, name: str, sparse_mode: str = "auto"):
    """A copy of spikelm (the same weights) set up as SPIKELM_ROWS[name] says, in eval mode."""
    mode, compiled, int8 = SPIKELM_ROWS[name]
    model = SpikeLMForCausalLM(spikelm.config)
    model.load_state_dict(spikelm.state_dict())
    model.set_sparse_inference(mode or sparse_mode, int8=int8)
    if compiled:
        model.compile_decoding()  # decoding steps through torch.compile (Inductor)
    return model.eval()


def build_models(args, names: list[str]):
    if args.model:
        from spikelm.eval.loading import load_model

        spikelm, tokenizer = load_model(args.model, "cpu", None, need_tokenizer=bool(args.prompt_file))
    else:
        spikelm, tokenizer = SpikeLMForCausalLM(spikelm_config(args)), None
    cfg = spikelm.config
    vocab, hidden, layers = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers
    heads = max(1, hidden // 64)
    n = sum(p.numel() for p in spikelm.parameters())
    models = {}
    for name in names:
        if name in SPIKELM_ROWS:
            models[name] = spikelm_row(spikelm, name, args.sparse_mode)
        elif name == "llama":
            # widen the MLP until the size matches SpikeLM's within a few percent
            size = _match(n, lambda m: _count(LlamaForCausalLM, LlamaConfig(
                vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=m, tie_word_embeddings=True)), lo=hidden, hi=16 * hidden)
            models[name] = LlamaForCausalLM(LlamaConfig(
                vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=heads, intermediate_size=size, max_position_embeddings=65536,
                tie_word_embeddings=True)).eval()
        elif name == "mamba":
            depth = _match(n, lambda L: _count(MambaForCausalLM, MambaConfig(vocab_size=vocab, hidden_size=hidden,
                                                                              num_hidden_layers=L)), lo=1, hi=8 * layers)
            models[name] = MambaForCausalLM(MambaConfig(vocab_size=vocab, hidden_size=hidden,
                                                        num_hidden_layers=depth)).eval()
        else:
            raise SystemExit(f"--models: unknown model {name!r} (known: {', '.join([*SPIKELM_ROWS, 'llama', 'mamba'])})")
    return models, tokenizer


def linear_weight_bytes(model) -> int:
    """Bytes of every nn.Linear weight (a dense decoding step reads each once; tied weights counted once)."""
    seen = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            seen[id(m.weight)] = m.weight.numel() * m.weight.element_size()
    return sum(seen.values())


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


class Decoder:
    """Greedy decoding of one model from a prompt, resumable: step(n) decodes n more tokens through its cache,
    timing each (wall and process CPU time) and recording RSS and cache size at the checkpoint lengths."""

    @torch.no_grad()
    def __init__(self, model, prompt: torch.Tensor, checkpoints: list[int]):
        self.model, self.checkpoints, self.proc = model, set(checkpoints), psutil.Process()
        out = model(prompt, use_cache=True)
        self.cache, self.token = out[CACHE_NAME], out.logits[:, -1:].argmax(-1)
        self.latencies, self.cpu_times, self.marks, self.tokens = [], [], {}, []

    @torch.no_grad()
    def step(self, n_tokens: int) -> None:
        for _ in range(n_tokens):
            with Stopwatch() as sw:
                out = self.model(self.token, use_cache=True, **{CACHE_NAME: self.cache})
                self.cache = out[CACHE_NAME]
                self.token = out.logits[:, -1:].argmax(-1)
            self.latencies.append(sw.wall)
            self.cpu_times.append(sw.cpu)
            self.tokens.append(int(self.token[0, 0]))
            i = len(self.tokens)
            if i in self.checkpoints:
                self.marks[i] = {"rss_mb": self.proc.memory_info().rss / 2**20,
                                 "cache_mb": _cache_bytes(self.cache) / 2**20,
                                 "tokens_per_s": i / sum(self.latencies), "tokens_per_cpu_s": i / sum(self.cpu_times)}


def decode(model, prompt: torch.Tensor, n_tokens: int, checkpoints: list[int]):
    """(latencies, CPU times, checkpoint marks, tokens) of n_tokens greedy steps from the prompt."""
    d = Decoder(model, prompt, checkpoints)
    d.step(n_tokens)
    return d.latencies, d.cpu_times, d.marks, d.tokens


def make_prompt(args, tokenizer, vocab: int) -> torch.Tensor:
    if args.prompt_file:
        ids = tokenizer(open(args.prompt_file, encoding="utf-8").read(), add_special_tokens=False)["input_ids"]
        if len(ids) < args.prompt_tokens:
            raise SystemExit(f"--prompt-file {args.prompt_file}: {len(ids)} tokens, fewer than --prompt-tokens")
        return torch.tensor(ids[: args.prompt_tokens])[None]
    return torch.randint(0, vocab, (1, args.prompt_tokens))


def run_row(row: dict, n_tokens: int) -> None:
    """n_tokens more steps of a row's decoder, counting the sparse op's calls by backend (counters, not
    record_backends: noting each eager call would be timed too)."""
    before = kernel_calls()
    row["decoder"].step(n_tokens)
    for backend, n in kernel_calls_since(before).items():
        row["calls"][backend] = row["calls"].get(backend, 0) + n


def row_result(args, name: str, model, row: dict, all_tokens: dict) -> dict:
    """A row's figures from its timed decoding (the per-token series from process CPU time or wall time)."""
    d = row["decoder"]
    # on a shared machine wall time measures the neighbours too: with one thread, process CPU
    # time per token is the model's own cost
    series = d.cpu_times if args.clock == "cpu" else d.latencies
    first = sum(series[:1024]) / min(1024, len(series))
    last = sum(series[-1024:]) / min(1024, len(series))
    extra = {}
    if name in SPIKELM_ROWS:
        all_tokens[name] = d.tokens
        extra["sparse_mode"] = model.lm_head.sparse_mode
        extra["int8"] = model.lm_head.sparse_int8
        extra["op_calls_per_token"] = {b: n / args.max_tokens for b, n in row["calls"].items()}
        # the sparse layouts of every row so far (interleaved: of all rows, so in the meta only)
        extra["weight_copies_mb"] = None if args.interleave else layouts_nbytes() / 2**20
    else:
        extra["weight_bytes_per_token"] = linear_weight_bytes(model)
    if args.interleave:  # the mean of every turn: its ratio to another row's same turn is free of the drift between turns
        n = args.interleave
        extra["turn_ms"] = [sum(series[i:i + n]) / len(series[i:i + n]) * 1e3 for i in range(0, len(series), n)]
    params = sum(p.numel() for p in model.parameters())
    print(f"{name}: {params / 1e6:.1f}M params, first 1k {first * 1e3:.2f} ms/token, last 1k {last * 1e3:.2f} "
          "ms/token", flush=True)
    return {"params": params, "warmup_s": row["warmup_s"], "checkpoints": d.marks, "first_1k_ms": first * 1e3,
            "last_1k_ms": last * 1e3, **extra,
            "latency_ms_per_1k": [sum(series[i:i + 1024]) / len(series[i:i + 1024]) * 1e3
                                  for i in range(0, len(series), 1024)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--window", type=int, default=512, help="SpikeLM attention window")
    parser.add_argument("--config", default=None, help="SpikeLM shape from a train.py YAML (random weights)")
    parser.add_argument("--model", default=None, help="a trained SpikeLM folder (save_pretrained) instead")
    parser.add_argument("--prompt-file", default=None, help="text whose first --prompt-tokens tokens are the prompt "
                                                            "(needs --model with its tokenizer); default: random ids")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--sparse-mode", choices=("auto", "on"), default="auto",
                        help="set_sparse_inference mode of the spikelm_sparse rows")
    parser.add_argument("--density-tokens", type=int, default=256,
                        help="decoding steps of the dense eager row that measure the spike density (bytes read)")
    parser.add_argument("--warmup-tokens", type=int, default=None,
                        help="untimed decoding steps before the timed run (default: the attention window + 32)")
    parser.add_argument("--models", default="spikelm,spikelm_compiled,mamba,llama")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="per-token time from process CPU time (robust on a shared machine) or wall time")
    parser.add_argument("--interleave", type=int, default=0, metavar="N",
                        help="decode every row N tokens in turn, all models alive, instead of one row after another "
                             "(0): the rows' tokens/s are then comparable within a run on a machine whose speed "
                             "drifts; RSS is then the whole process's")
    parser.add_argument("--note", default=None, help="free text stored in the JSON")
    parser.add_argument("--out", default=os.path.join(RESULTS, "bench_generation"))
    args = parser.parse_args()
    if args.interleave < 0:
        parser.error(f"--interleave must be 0 (rows one after another) or a number of tokens, got {args.interleave}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    # each compiled SpikeLM row compiles the same decoding function again (and once more when KV caches grow)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    checkpoints = sorted({n for n in (1024, 2048, 4096, 8192, 16384, 32768) if n <= args.max_tokens} | {args.max_tokens})
    names = args.models.split(",")
    models, tokenizer = build_models(args, names)
    spike_cfg = next((m.config for n, m in models.items() if n in SPIKELM_ROWS), None)
    window = spike_cfg.attention_window if spike_cfg is not None and spike_cfg.attention_window else args.window
    warmup = args.warmup_tokens if args.warmup_tokens is not None else window + 32
    vocab = next(iter(models.values())).config.vocab_size
    prompt = make_prompt(args, tokenizer, vocab)
    load_before = os.getloadavg()
    results, all_tokens, density, rows = {}, {}, None, {}
    for name in names:
        model = models[name]
        gc.collect()
        if name == "spikelm":
            with SpikeDensityMonitor(model) as monitor:  # eager and dense: the density these weights and prompt give
                decode(model, prompt, args.density_tokens, [])
            density = monitor.report()
        # warm-up, not timed below: for the compiled models their compilations, the last of which comes
        # when the attention blocks' KV caches reach the window
        with Stopwatch() as sw:
            decode(model, prompt, warmup, [])
        # the prompt's prefill happens here: the op calls counted below are the decoding steps' only
        rows[name] = {"warmup_s": sw.wall, "decoder": Decoder(model, prompt, checkpoints), "calls": {}}
        if not args.interleave:  # one row at a time: each row's RSS growth is its own
            run_row(rows[name], args.max_tokens)
            results[name] = row_result(args, name, model, rows.pop(name), all_tokens)
            del model
            models[name] = None
    # interleaved: every row decodes --interleave tokens in turn, so a drift in the machine's speed reaches
    # every row alike (their ratios are then comparable within the run); RSS is the process's, all rows alive
    done = 0
    while rows and done < args.max_tokens:
        n = min(args.interleave, args.max_tokens - done)
        for row in rows.values():
            run_row(row, n)
        done += n
    for name, row in rows.items():
        results[name] = row_result(args, name, models[name], row, all_tokens)
    for name, tokens in all_tokens.items():
        r = results[name]
        if "spikelm" in all_tokens:
            diverge = next((i for i, (a, b) in enumerate(zip(tokens, all_tokens["spikelm"])) if a != b), None)
            r["same_tokens_as_dense_eager"], r["first_divergence"] = diverge is None, diverge
        if r.get("int8") and name != "spikelm_sparse_int8" and "spikelm_sparse_int8" in all_tokens:
            r["same_tokens_as_int8_eager"] = tokens == all_tokens["spikelm_sparse_int8"]
        if density is not None:
            key = {"off": "dense", "on": "sparse", "auto": "auto"}[r["sparse_mode"]]
            r["weight_bytes_per_token"] = density["total"][("int8_" if r["int8"] else "") + f"{key}_bytes_per_token"]

    c0, cN = checkpoints[0], checkpoints[-1]
    rate = "tokens_per_cpu_s" if args.clock == "cpu" else "tokens_per_s"
    print(f"\n{'model':<24}{'params':>9}{'tok/s@' + str(c0):>12}{'tok/s@end':>10}{'MB read/token':>14}"
          f"{'RSS growth':>12}{'cache@end MB':>13}{'same tokens':>12}")
    for name, r in results.items():
        m = r["checkpoints"]
        # interleaved rows share one process's growth: no row's own
        growth = None if args.interleave else (m[cN]["rss_mb"] - m[c0]["rss_mb"]) / m[c0]["rss_mb"] * 100
        r["rss_growth_pct"] = growth
        r["latency_ratio_last_first"] = r["last_1k_ms"] / r["first_1k_ms"]
        mb = r.get("weight_bytes_per_token")
        same = r.get("same_tokens_as_dense_eager")
        print(f"{name:<24}{r['params'] / 1e6:>8.1f}M{m[c0][rate]:>12.1f}{m[cN][rate]:>10.1f}"
              f"{'-' if mb is None else f'{mb / 2**20:.1f}':>14}{'-' if growth is None else f'{growth:.2f}%':>12}"
              f"{m[cN]['cache_mb']:>13.2f}"
              f"{'-' if same is None else str(same):>12}")
    reference = "spikelm_compiled"
    if args.interleave and reference in results:
        # per turn, how much faster than dense compiled each row ran in that same turn: the median over turns is
        # robust to a machine whose speed changes during the run, where the ratio of whole-run rates is not
        print(f"\nspeed-up over {reference}, per turn of {args.interleave} tokens: median (min-max)")
        ref_turns = results[reference]["turn_ms"]
        for name, r in results.items():
            ratios = sorted(a / b for a, b in zip(ref_turns, r["turn_ms"]))
            r["turn_speedup_over_dense_compiled"] = {"median": statistics.median(ratios), "min": ratios[0],
                                                     "max": ratios[-1], "turns": len(ratios)}
            if name != reference:
                print(f"  {name:<24}{statistics.median(ratios):6.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f}, "
                      f"{len(ratios)} turns)")
    if density is not None:
        print(f"\nspike density of the spike-fed linears (dense eager, first {args.density_tokens} steps): "
              f"{density['mean_density']:.3f} by inputs, {density['weight_weighted_density']:.3f} by weights")

    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "args": vars(args),
            "weights": f"trained: {args.model}" if args.model else "random", "note": args.note,
            "spike_density": density, "weight_copies_mb": layouts_nbytes() / 2**20}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json.tmp", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    os.replace(args.out + ".json.tmp", args.out + ".json")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for name, r in results.items():
            xs = [min((i + 1) * 1024, args.max_tokens) for i in range(len(r["latency_ms_per_1k"]))]
            ax1.plot(xs, r["latency_ms_per_1k"], marker="o" if len(xs) < 4 else None, label=name)
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
