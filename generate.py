#!/usr/bin/env python
"""Stream text from a saved SpikeLM model in constant memory.

    python generate.py --model DIR --prompt "Once upon a time" --max_new_tokens 200 --temperature 0.8 --top_p 0.95
    python generate.py --model DIR --prompt_file prompt.txt --max_new_tokens 30000 --ignore_eos > out.txt
    python generate.py --model DIR --interactive          # a chat-like loop on one carried state

Tokens go to stdout as they are made; tokens/s and peak memory go to stderr at the end. The
model's state (spikelm.StreamingGenerator) is O(1) in the text length, so --max_new_tokens can be
far beyond the training length. --interactive feeds each new line into the same state: the
history is never re-read.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="folder written by save_pretrained (model + tokenizer), or a Hub model id (as from_pretrained)")
    p.add_argument("--revision", default=None, help="Hub model: branch, tag or commit (default: main)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt_file", help="file holding the prompt (UTF-8)")
    p.add_argument("--max_new_tokens", type=int, default=256, help="tokens to generate (per turn in --interactive)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="> 1 discourages recent tokens (1 = off)")
    p.add_argument("--penalty_window", type=int, default=64, help="recent tokens the repetition penalty looks at")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampler")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (auto: as saved)")
    p.add_argument("--chunk_size", type=int, default=1024, help="prompt tokens per parallel chunk")
    p.add_argument("--ignore_eos", action="store_true", help="keep generating past the end-of-text token")
    p.add_argument("--interactive", action="store_true", help="read turns from stdin, keeping the state")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token steps: faster long streams, after a compile of seconds to minutes")
    p.add_argument("--sparse", choices=("auto", "on", "off"), default="auto",
                   help="spike-sparse linear layers on CPU: read only the weights of the inputs that fired (auto: "
                        "where the measured density makes it pay; on: always; off: dense)")
    p.add_argument("--int8", action="store_true",
                   help="with --sparse auto|on: the sparse product reads int8 weights with one scale per output feature "
                        "(a quarter of float32 weights' bytes; perplexity changes slightly, see docs/sparse-inference.md)")
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (1024 * 1024) if sys.platform == "darwin" else kib / 1024


def report(stats: dict, gen, device) -> None:
    import torch

    secs = stats["gen_seconds"]
    rate = stats["generated"] / secs if secs > 0 else float("nan")
    msg = (f"[generate] {stats['generated']} tokens in {secs:.2f} s ({rate:.1f} tokens/s); prompt "
           f"{stats['prompt_tokens']} tokens in {stats['prompt_seconds']:.2f} s; peak RSS {peak_rss_mib():.0f} MiB; "
           f"model state {gen.state_nbytes() / 1024:.1f} KiB; sparse {stats['sparse']}")
    from spikelm.ops.spike_linear import kernel_calls_since

    calls = kernel_calls_since(stats["calls_before"])
    if calls:
        msg += " (spike_linear calls: " + ", ".join(f"{b} {n}" for b, n in calls.items()) + ")"
    if stats["int8"] and stats["generated"] and not any(b.endswith("_int8") for b in calls):
        msg += ("; --int8: no call took the int8 product (every layer is below the sparse crossover, or the C++ "
                "kernel is not built): try --sparse on")
    if device.type == "cuda":
        msg += f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from spikelm.eval.loading import UserError, check_sparse_flags, load_model, read_text_file, resolve_device
    from spikelm.models.streaming import SamplingParams

    try:
        if args.max_new_tokens < 0:
            raise UserError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
        if args.chunk_size < 1:
            raise UserError(f"--chunk_size must be >= 1, got {args.chunk_size}")
        if args.penalty_window < 0:
            raise UserError(f"--penalty_window must be >= 0, got {args.penalty_window}")
        try:
            SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty)
        except ValueError as e:
            raise UserError(f"--{e}") from None
        if args.prompt_file is not None:
            prompt = read_text_file(args.prompt_file, "--prompt_file")
        else:
            prompt = args.prompt
        check_sparse_flags(args.sparse, args.int8, resolve_device(args.device))
        if prompt is None and not args.interactive:
            raise UserError("give --prompt TEXT or --prompt_file FILE (or --interactive)")
        if prompt is not None and not prompt.strip() and not args.interactive:
            raise UserError("the prompt is empty: give at least one character of text")
        model, tokenizer = load_model(args.model, args.device, args.dtype, revision=args.revision)
        if not model.model.supports_cache:
            raise UserError(f"--model {args.model}: a PSN model keeps no state between tokens, so it cannot "
                            "stream in constant memory (use model.generate() from Python)")
    except UserError as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 2

    import torch

    if args.seed is not None:
        torch.manual_seed(args.seed)
    model.set_sparse_inference(args.sparse, int8=args.int8)
    if args.compile:
        model.compile_decoding()
    from spikelm import StreamingGenerator
    from spikelm.ops.spike_linear import kernel_calls

    gen = StreamingGenerator(model, tokenizer, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                             repetition_penalty=args.repetition_penalty, penalty_window=args.penalty_window,
                             chunk_size=args.chunk_size, seed=args.seed, stop_at_eos=not args.ignore_eos)
    device = next(model.parameters()).device
    stats = {"generated": 0, "gen_seconds": 0.0, "prompt_tokens": 0, "prompt_seconds": 0.0,
             "sparse": args.sparse + (" int8" if args.int8 else ""), "int8": args.int8, "calls_before": kernel_calls()}

    def feed(text: str) -> int:
        t = time.perf_counter()
        n = gen.feed(text)
        stats["prompt_tokens"] += n
        stats["prompt_seconds"] += time.perf_counter() - t
        return n

    def run(n: int) -> None:
        t = time.perf_counter()
        try:
            for token in gen.generate(n):
                piece = gen.decode_piece(token)
                stats["generated"] += 1
                if piece:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            tail = gen.flush_text()
            if tail:
                sys.stdout.write(tail)
            sys.stdout.flush()
        finally:
            stats["gen_seconds"] += time.perf_counter() - t

    try:
        if prompt is not None and prompt.strip():
            if feed(prompt) == 0:
                print("generate.py: error: the prompt encodes to no tokens", file=sys.stderr)
                return 2
            run(args.max_new_tokens)
            if args.interactive:
                print(flush=True)
        if args.interactive:
            while True:
                print("> ", end="", file=sys.stderr, flush=True)
                line = sys.stdin.readline()
                if not line:  # EOF
                    break
                if not line.strip():
                    continue
                feed(line if line.endswith("\n") else line + "\n")  # the new turn only: the state holds the rest
                run(args.max_new_tokens)
                print(flush=True)  # end of the turn
        if not args.interactive:
            print(flush=True)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        report(stats, gen, device)
        return 130
    except BrokenPipeError:  # e.g. piped into head: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    report(stats, gen, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
