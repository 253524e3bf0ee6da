"""serve.py under load: concurrent streams, multi-turn time to first token, memory per session, kill -9.

The server is a serve.py subprocess (--threads 1 by default), the clients are asyncio streams in this
process speaking raw HTTP (light enough to leave the CPU to the server); both on this machine.

    python benchmarks/bench_serve.py --model runs/tiny          # a trained model folder
    python benchmarks/bench_serve.py --shape small              # small.yaml's shape, random weights

Phases (each on a fresh server and state folder):
1. throughput: N concurrent streaming completions (N in --streams), --tokens each (ignore_eos, greedy):
   aggregate tokens/s, per-stream tokens/s, p50/p99 gap between a stream's token chunks, time to first token.
2. turns: a --turns-turn chat conversation resending its whole history each turn, like any OpenAI
   client, --conversations times; time to first token of every turn, with the prefix cache and with
   --no_prefix_cache.
3. memory: --sessions live sessions at each history length in --histories: the server's RSS growth per
   session and the state bytes it holds, against the KV cache of a transformers Llama of the same
   parameter count at the same history.
4. kill -9: a conversation (plain and session) killed with SIGKILL halfway, the server restarted on the
   same state folder: are the replies those of an uninterrupted run, and are the states reused?

Writes benchmarks/results/bench_serve.json and .png (--out).
"""
from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_generation import _cache_bytes, _count, _match  # noqa: E402


# -- the server ------------------------------------------------------------------------------------------------
class Server:
    def __init__(self, model_dir, state_dir, threads: int, *extra, env: dict | None = None):
        self.env = {**os.environ, **(env or {})}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.cmd = [sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), "--port", str(self.port),
                    "--state_dir", str(state_dir), "--threads", str(threads), "--log_level", "warning", *extra]
        self.start()

    def start(self):
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=subprocess.DEVNULL, env=self.env)
        atexit.register(self.stop)  # a phase that raises must not leave its server running
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve.py exited with {self.proc.returncode}: {' '.join(self.cmd)}")
            try:
                asyncio.run(request(self.port, "GET", "/health"))
                return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("serve.py did not come up")

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def request(port: int, method: str, path: str, body: dict | None = None) -> dict:
    """One HTTP/1.0 request; a streaming body comes back as its SSE events with their arrival times."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = b"" if body is None else json.dumps(body).encode()
    t_send = time.perf_counter()
    writer.write(f"{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    while (await reader.readline()) not in (b"\r\n", b""):
        pass
    events, data = [], b""
    if body is not None and body.get("stream"):
        async for line in reader:
            if line.startswith(b"data: "):
                events.append((time.perf_counter(), line[6:].strip()))
    else:
        data = await reader.read()
    writer.close()
    if status != 200:
        raise RuntimeError(f"{path}: HTTP {status}: {data[:300]!r} {events[:1]}")
    if body is not None and body.get("stream"):
        return {"t_send": t_send, "events": events}
    return json.loads(data)


async def stream(port: int, path: str, body: dict) -> dict:
    """A streaming request: text, token-chunk arrival times, usage."""
    out = await request(port, "POST", path, {**body, "stream": True, "stream_options": {"include_usage": True}})
    times, text, usage = [], [], None
    for t, raw in out["events"]:
        if raw == b"[DONE]":
            break
        obj = json.loads(raw)
        if obj.get("error"):
            raise RuntimeError(obj["error"])
        if obj.get("usage"):
            usage = obj["usage"]
        for c in obj["choices"]:
            piece = c.get("text") if "text" in c else c.get("delta", {}).get("content")
            if piece:
                times.append(t)
                text.append(piece)
    return {"t_send": out["t_send"], "times": times, "text": "".join(text), "usage": usage}


# -- helpers -----------------------------------------------------------------------------------------------------
def passages(n: int, seed: int = 0) -> list[str]:
    lines = [l.strip() for l in (ROOT / "data" / "paradise_lost_train.txt").read_text().splitlines() if len(l.strip()) > 30]
    rng = random.Random(seed)
    return [rng.choice(lines) for _ in range(n)]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def build_model(shape: str, folder: Path) -> Path:
    """A random-weight SpikeLM of configs/<shape>.yaml's shape with a BPE trained on the shipped text."""
    import yaml

    from spikelm import SpikeLMConfig, SpikeLMForCausalLM
    from spikelm.data import train_bpe_tokenizer

    cfg = yaml.safe_load((ROOT / "configs" / f"{shape}.yaml").read_text())
    text = (ROOT / "data" / "paradise_lost_train.txt").read_text().split("\n\n")
    tok = train_bpe_tokenizer(text, cfg["vocab_size"])
    fields = {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "attention_window",
                                  "block_types", "max_spike") if k in cfg}
    torch.manual_seed(0)
    model = SpikeLMForCausalLM(SpikeLMConfig(vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                             pad_token_id=tok.pad_token_id, **fields))
    out = folder / f"{shape}_random"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def llama_kv_bytes(model_dir: Path, histories: list[int]) -> dict:
    """KV-cache bytes of a transformers Llama with SpikeLM's parameter count (MLP width matched) after each history."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spikelm.eval.loading import load_model

    spike, _ = load_model(model_dir, need_tokenizer=False)
    c = spike.config
    n = sum(p.numel() for p in spike.parameters())
    heads = max(1, c.hidden_size // 64)

    def config(m):
        return LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                           num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=m,
                           max_position_embeddings=max(histories) + 16, tie_word_embeddings=True)

    llama = LlamaForCausalLM(config(_match(n, lambda m: _count(LlamaForCausalLM, config(m)), lo=c.hidden_size,
                                           hi=16 * c.hidden_size))).eval()
    out = {"params": sum(p.numel() for p in llama.parameters()), "spikelm_params": n, "kv_bytes": {}}
    with torch.no_grad():
        for h in histories:
            ids = torch.randint(0, c.vocab_size, (1, h))
            cache = llama(ids, use_cache=True).past_key_values
            out["kv_bytes"][h] = _cache_bytes(cache)
    return out


# -- phases --------------------------------------------------------------------------------------------------------
async def throughput(port: int, name: str, n: int, tokens: int, prompts: list[str]) -> dict:
    body = {"model": name, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
    t0 = time.perf_counter()
    runs = await asyncio.gather(*(stream(port, "/v1/completions", {**body, "prompt": prompts[i]}) for i in range(n)))
    wall = max(r["times"][-1] for r in runs) - t0
    total = sum(r["usage"]["completion_tokens"] for r in runs)
    gaps = [b - a for r in runs for a, b in zip(r["times"], r["times"][1:])]
    # the window in which every stream was decoding: the batch at full size
    lo, hi = max(r["times"][0] for r in runs), min(r["times"][-1] for r in runs)
    steady = sum(lo <= t <= hi for r in runs for t in r["times"]) / (hi - lo) if hi > lo else float("nan")
    per_stream = [(len(r["times"]) - 1) / (r["times"][-1] - r["times"][0]) for r in runs]
    return {"streams": n, "tokens": total, "wall_s": wall, "aggregate_tokens_per_s": total / wall,
            "steady_tokens_per_s": steady, "per_stream_tokens_per_s_median": statistics.median(per_stream),
            "gap_ms_p50": pct(gaps, 50) * 1e3, "gap_ms_p99": pct(gaps, 99) * 1e3,
            "ttft_ms_median": statistics.median((r["times"][0] - r["t_send"]) * 1e3 for r in runs),
            "ttft_ms_max": max((r["times"][0] - r["t_send"]) * 1e3 for r in runs)}


async def conversation(port: int, name: str, turns: int, reply_tokens: int, seed: int, session: str | None = None,
                       start: int = 0, history: list | None = None) -> list[dict]:
    """Turns start..turns-1 of a chat; each resends the whole history (or, with a session, the new message only)."""
    users = passages(turns, seed)
    history = history if history is not None else [{"role": "system", "content": "You are a poet of Paradise Lost."}]
    out = []
    for k in range(start, turns):
        history.append({"role": "user", "content": users[k]})
        body = {"model": name, "messages": history if session is None else history[-1:], "max_tokens": reply_tokens,
                "temperature": 0, "ignore_eos": True}
        if session is not None:
            body["session_id"] = session
            if k == 0:
                body["messages"] = history[:]
        r = await stream(port, "/v1/chat/completions", body)
        history.append({"role": "assistant", "content": r["text"]})
        out.append({"turn": k + 1, "ttft_ms": (r["times"][0] - r["t_send"]) * 1e3, "text": r["text"],
                    "prompt_tokens": r["usage"]["prompt_tokens"],
                    "cached_tokens": r["usage"]["prompt_tokens_details"]["cached_tokens"]})
    return out


async def make_sessions(port: int, name: str, count: int, length: int, vocab: int, tag: str):
    rng = random.Random(length)
    for i in range(count):
        ids = [rng.randrange(2, vocab) for _ in range(length)]
        await request(port, "POST", "/v1/completions", {"model": name, "prompt": ids, "max_tokens": 1,
                                                        "session_id": f"{tag}-{length}-{i}", "temperature": 0})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a saved model folder (e.g. the trained tiny model)")
    src.add_argument("--shape", choices=("tiny", "small"), help="random weights of configs/<shape>.yaml's shape")
    p.add_argument("--threads", type=int, default=1, help="the server's --threads")
    p.add_argument("--streams", default="1,8,32,64")
    p.add_argument("--tokens", type=int, default=128, help="tokens per stream in the throughput phase")
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--reply_tokens", type=int, default=32)
    p.add_argument("--conversations", type=int, default=3)
    p.add_argument("--sessions", type=int, default=128)
    p.add_argument("--histories", default="256,1024,4096")
    p.add_argument("--malloc_mmap_threshold", type=int, default=131072,
                   help="the memory phase's server runs with MALLOC_MMAP_THRESHOLD_ set to this (glibc): freed prefill "
                        "buffers then leave the process instead of staying resident, so RSS follows live memory "
                        "(0: glibc's default, dynamic threshold)")
    p.add_argument("--phases", default="throughput,turns,memory,kill")
    p.add_argument("--out", default=str(RESULTS / "bench_serve"))
    args = p.parse_args()
    phases = args.phases.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    model_dir = Path(args.model) if args.model else build_model(args.shape, tmp)
    model_cfg = json.loads((model_dir / "config.json").read_text())
    name = model_dir.resolve().name
    results: dict = {"model": {"folder": str(model_dir), "source": "trained" if args.model else f"random {args.shape}",
                               "config": {k: model_cfg.get(k) for k in ("hidden_size", "num_hidden_layers",
                                                                          "block_types", "attention_window",
                                                                          "vocab_size")}}}
    loads = {"start": os.getloadavg()}

    if "throughput" in phases:
        srv = Server(model_dir, tmp / "states_tp", args.threads, "--max_batch", "64")
        prompts = passages(64, seed=1)
        asyncio.run(throughput(srv.port, name, 4, 16, prompts))  # warm-up
        rows = []
        for n in [int(x) for x in args.streams.split(",")]:
            load0 = os.getloadavg()
            r = asyncio.run(throughput(srv.port, name, n, args.tokens, prompts))
            r.update(loadavg_before=load0, loadavg_after=os.getloadavg())
            rows.append(r)
            print(f"{n:>3} streams: {r['aggregate_tokens_per_s']:7.1f} tok/s aggregate ({r['steady_tokens_per_s']:7.1f} "
                  f"steady), per stream {r['per_stream_tokens_per_s_median']:6.1f} tok/s, gap p50 "
                  f"{r['gap_ms_p50']:6.1f} ms p99 {r['gap_ms_p99']:6.1f} ms, TTFT {r['ttft_ms_median']:6.0f} ms "
                  f"(load {load0[0]:.1f})", flush=True)
        srv.stop()
        base = rows[0]["aggregate_tokens_per_s"]
        for r in rows:
            r["speedup_vs_1"] = r["aggregate_tokens_per_s"] / base
        results["throughput"] = rows

    if "turns" in phases:
        turns = {}
        for label, extra in (("prefix_cache", []), ("no_prefix_cache", ["--no_prefix_cache"])):
            srv = Server(model_dir, tmp / f"states_{label}", args.threads, *extra)
            asyncio.run(conversation(srv.port, name, 2, 4, seed=99))  # warm-up
            load0 = os.getloadavg()
            runs = [asyncio.run(conversation(srv.port, name, args.turns, args.reply_tokens, seed=10 + c))
                    for c in range(args.conversations)]
            srv.stop()
            per_turn = [{"turn": k + 1, "ttft_ms_median": statistics.median(run[k]["ttft_ms"] for run in runs),
                         "prompt_tokens": runs[0][k]["prompt_tokens"], "cached_tokens": runs[0][k]["cached_tokens"]}
                        for k in range(args.turns)]
            turns[label] = {"per_turn": per_turn, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                            "replies": [[t["text"] for t in run] for run in runs]}
            first, last = per_turn[0]["ttft_ms_median"], per_turn[-1]["ttft_ms_median"]
            turns[label]["last_over_first"] = last / first
            print(f"{label}: TTFT turn 1 {first:.1f} ms, turn {args.turns} {last:.1f} ms ({last / first:.2f}x); "
                  f"turn {args.turns} prompt {per_turn[-1]['prompt_tokens']} tokens, "
                  f"{per_turn[-1]['cached_tokens']} cached", flush=True)
        turns["same_replies_with_and_without_cache"] = (turns["prefix_cache"]["replies"]
                                                        == turns["no_prefix_cache"]["replies"])
        print(f"greedy replies identical with and without the prefix cache: "
              f"{turns['same_replies_with_and_without_cache']}")
        results["turns"] = turns

    if "memory" in phases:
        histories = [int(x) for x in args.histories.split(",")]
        env = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else {}
        srv = Server(model_dir, tmp / "states_mem", args.threads, "--no_prefix_cache", "--max_prompt_tokens",
                     str(max(histories) + 16), "--max_sessions", str(args.sessions * len(histories) + 256), env=env)
        vocab = model_cfg["vocab_size"]
        for h in histories:  # warm-up: the allocator's and the store's first growth is not the sessions'
            asyncio.run(make_sessions(srv.port, name, 16, h, vocab, "warmup"))
        rows = []
        for h in histories:
            rss0 = srv.rss()
            held0 = asyncio.run(request(srv.port, "GET", "/health"))["states"]["memory_bytes"]
            t0 = time.perf_counter()
            asyncio.run(make_sessions(srv.port, name, args.sessions, h, vocab, "s"))
            secs = time.perf_counter() - t0
            time.sleep(1.0)  # idle: the engine returns freed memory (malloc_trim)
            held1 = asyncio.run(request(srv.port, "GET", "/health"))["states"]["memory_bytes"]
            rss1 = srv.rss()
            rows.append({"history": h, "sessions": args.sessions, "rss_bytes_per_session": (rss1 - rss0) / args.sessions,
                         "state_bytes_per_session": (held1 - held0) / args.sessions, "rss_after_bytes": rss1,
                         "seconds": secs})
            print(f"history {h:>6}: RSS +{(rss1 - rss0) / args.sessions / 1024:8.1f} KiB per session, state "
                  f"{(held1 - held0) / args.sessions / 1024:.1f} KiB ({args.sessions} sessions in {secs:.1f} s)",
                  flush=True)
        srv.stop()
        llama = llama_kv_bytes(model_dir, histories)
        for r in rows:
            r["llama_kv_bytes"] = llama["kv_bytes"][r["history"]]
            print(f"history {r['history']:>6}: same-size Llama KV cache {r['llama_kv_bytes'] / 1024:10.1f} KiB")
        results["memory"] = {"rows": rows, "llama": {k: v for k, v in llama.items() if k != "kv_bytes"},
                             "server_env": env}

    if "kill" in phases:
        turns, half = 6, 3
        ref_srv = Server(model_dir, tmp / "states_ref", args.threads)
        ref = asyncio.run(conversation(ref_srv.port, name, turns, 16, seed=5))
        ref_session = asyncio.run(conversation(ref_srv.port, name, turns, 16, seed=6, session="ref"))
        ref_srv.stop()
        srv = Server(model_dir, tmp / "states_kill", args.threads)
        history = [{"role": "system", "content": "You are a poet of Paradise Lost."}]
        session_history = [{"role": "system", "content": "You are a poet of Paradise Lost."}]
        before = asyncio.run(conversation(srv.port, name, half, 16, seed=5, history=history))
        before_s = asyncio.run(conversation(srv.port, name, half, 16, seed=6, session="kept", history=session_history))
        srv.kill9()
        t0 = time.perf_counter()
        srv.start()
        restart_s = time.perf_counter() - t0
        after = asyncio.run(conversation(srv.port, name, turns, 16, seed=5, start=half, history=history))
        after_s = asyncio.run(conversation(srv.port, name, turns, 16, seed=6, session="kept", start=half,
                                           history=session_history))
        srv.stop()
        same = [t["text"] for t in before + after] == [t["text"] for t in ref]
        same_s = [t["text"] for t in before_s + after_s] == [t["text"] for t in ref_session]
        results["kill9"] = {"replies_equal_uninterrupted": same, "session_replies_equal_uninterrupted": same_s,
                            "turn_after_restart_cached_tokens": after[0]["cached_tokens"],
                            "turn_after_restart_prompt_tokens": after[0]["prompt_tokens"],
                            "session_turn_after_restart_cached_tokens": after_s[0]["cached_tokens"],
                            "restart_seconds": restart_s}
        print(f"kill -9 after turn {half}: replies equal to the uninterrupted run: {same} (session: {same_s}); "
              f"turn {half + 1} resumed {after[0]['cached_tokens']} of {after[0]['prompt_tokens']} prompt tokens "
              f"from disk (session: {after_s[0]['cached_tokens']})")

    loads["end"] = os.getloadavg()
    meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "server_threads": args.threads, "loadavg": loads,
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "args": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.with_suffix(".json")).write_text(json.dumps({"meta": meta, **results}, indent=2))
    plot(results, out.with_suffix(".png"), args)
    print(f"wrote {out.with_suffix('.json')} and .png")


def plot(results: dict, path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    if "throughput" in results:
        rows = results["throughput"]
        xs = [r["streams"] for r in rows]
        ax = axes[0]
        ax.plot(xs, [r["aggregate_tokens_per_s"] for r in rows], marker="o", label="aggregate tokens/s")
        ax.plot(xs, [rows[0]["aggregate_tokens_per_s"] * x for x in xs], ls=":", color="grey", label="linear in streams")
        ax2 = ax.twinx()
        ax2.plot(xs, [r["gap_ms_p50"] for r in rows], marker="s", color="C2", label="token gap p50 (ms)")
        ax2.plot(xs, [r["gap_ms_p99"] for r in rows], marker="^", color="C3", label="token gap p99 (ms)")
        ax.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="tokens/s", title="throughput")
        ax2.set_ylabel("ms between tokens of a stream")
        ax.legend(loc="upper left", fontsize=8), ax2.legend(loc="lower right", fontsize=8)
    if "turns" in results:
        ax = axes[1]
        for label, style in (("prefix_cache", "-o"), ("no_prefix_cache", "--s")):
            per = results["turns"][label]["per_turn"]
            ax.plot([t["turn"] for t in per], [t["ttft_ms_median"] for t in per], style, label=label.replace("_", " "))
        ax.set(xlabel="turn (whole history resent)", ylabel="time to first token (ms)",
               title=f"{args.turns}-turn chat", ylim=(0, None))
        ax.legend(fontsize=8)
    if "memory" in results:
        ax = axes[2]
        rows = results["memory"]["rows"]
        xs = [r["history"] for r in rows]
        ax.plot(xs, [r["rss_bytes_per_session"] / 1024 for r in rows], marker="o", label="SpikeLM server RSS / session")
        ax.plot(xs, [r["state_bytes_per_session"] / 1024 for r in rows], marker="x", label="SpikeLM state / session")
        ax.plot(xs, [r["llama_kv_bytes"] / 1024 for r in rows], marker="s", label="same-size Llama KV cache")
        ax.set(xscale="log", yscale="log", xlabel="history (tokens)", ylabel="KiB per live session",
               title="memory per conversation")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
