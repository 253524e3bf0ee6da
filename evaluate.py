#!/usr/bin/env python
"""Evaluate a saved SpikeLM model: perplexity, perplexity by position (length extrapolation), spiking analysis.

    # perplexity on a text file, windows of the training length, each from a fresh state
    python evaluate.py ppl --model DIR --text_file test.txt
    # perplexity by position to 16x the training length, parallel and streaming (they must agree)
    python evaluate.py position --model DIR --text_file test.txt --train_len 512 --multiple 16 \\
        --out_json benchmarks/results/ppl_by_position.json --out_png benchmarks/results/ppl_by_position.png
    # firing rates, spikes per token, energy (spiking vs non-spiking), unfolded-spike logits check, and per
    # spike-fed linear the input density and the bytes of weights a decoding step reads, dense and sparse
    python evaluate.py spikes --model DIR --text_file test.txt --tokens 2048 --out_json spikes.json --out_png spikes.png

Every command prints its JSON to stdout (and to --out_json); the JSON records the command line.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="folder written by save_pretrained (model + tokenizer), or a Hub model id (as from_pretrained)")
    p.add_argument("--revision", default=None, help="Hub model: branch, tag or commit (default: main)")
    p.add_argument("--text_file", required=True, help="UTF-8 text, read as one token stream")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if available)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (auto: as saved)")
    p.add_argument("--max_tokens", type=int, default=None, help="use at most this many tokens of the file")
    p.add_argument("--out_json", default=None, help="write the result here too")
    p.add_argument("--note", default=None, help="free text stored in the JSON (what the model is, caveats)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("ppl", help="perplexity on a text file")
    _common(q)
    q.add_argument("--context", type=int, default=None,
                   help="tokens per window, each scored from a fresh state (default: the training length if the "
                        "model folder records it, else 512); 0: the whole file as one stream")
    q.add_argument("--mode", choices=("parallel", "streaming"), default="parallel")
    q.add_argument("--chunk_size", type=int, default=None,
                   help="tokens per forward, carrying the cache (parallel default: one forward per window; "
                        "streaming default: 1, the serial step)")
    q.add_argument("--sparse", choices=("auto", "on", "off"), default="auto",
                   help="the spike-fed linears' product on CPU, as in generate.py (auto: sparse on calls of <= 16 rows "
                        "where the density pays, so streaming; on: every call sparse; off: dense)")
    q.add_argument("--int8", action="store_true",
                   help="the sparse product reads int8 weights (one scale per output feature): the perplexity cost of "
                        "generate.py --int8 (--sparse on scores every token with it; auto the decoding steps' calls)")

    q = sub.add_parser("position", help="perplexity by position over long windows (length extrapolation)")
    _common(q)
    q.add_argument("--train_len", type=int, default=None, help="training block size (default: from run_config.json)")
    q.add_argument("--multiple", type=float, default=16, help="window length = multiple x train_len (+1 token)")
    q.add_argument("--windows", type=int, default=4, help="at most this many windows")
    q.add_argument("--stride", type=int, default=None,
                   help="a window starts every STRIDE tokens (default: the window length, no overlap); a shorter "
                        "stride moves the same text to other positions, averaging content out of the curve")
    q.add_argument("--bucket_size", type=int, default=None, help="positions per bucket (default: train_len / 2)")
    q.add_argument("--modes", default="parallel,streaming", help="comma-separated: parallel, streaming")
    q.add_argument("--parallel_chunk", type=int, default=None,
                   help="parallel mode: tokens per forward, carrying the cache (default: one forward per window)")
    q.add_argument("--stream_chunk", type=int, default=1,
                   help="streaming mode: tokens per step through the cache (1: the serial O(1) step)")
    q.add_argument("--out_png", default=None, help="plot of perplexity vs position")

    q = sub.add_parser("spikes", help="firing rates, spikes per token, energy estimate, unfolding check, density and "
                                      "bytes of weights read per token (dense and sparse)")
    _common(q)
    q.add_argument("--tokens", type=int, default=1024, help="tokens of the file to run (one parallel forward)")
    q.add_argument("--mac_pj", type=float, default=4.6, help="energy of a multiply-accumulate (pJ)")
    q.add_argument("--ac_pj", type=float, default=0.9, help="energy of an accumulate (pJ)")
    q.add_argument("--no_unfold_check", action="store_true", help="skip the unfolded-spike logits check")
    q.add_argument("--out_png", default=None, help="chart of firing rates and energy")
    return p.parse_args(argv)


def _tokens(tokenizer, text: str, max_tokens):
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def _meta(args, model, device, command: str) -> dict:
    import torch

    return {"command": command, "note": args.note,
            "model": str(args.model), "text_file": str(args.text_file), "device": str(device),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "torch": torch.__version__,
            "machine": platform.machine(), "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "parameters": sum(p.numel() for p in model.parameters())}


def unigram_perplexity(ids) -> float:
    """Perplexity of the best context-free model of these very tokens (their own unigram frequencies): a
    model that does not beat it has learned no use of context."""
    import math

    import torch

    counts = torch.bincount(ids.flatten()).double()
    p = counts[counts > 0] / counts.sum()
    return math.exp(float(-(p * p.log()).sum()))


def cmd_ppl(args, model, tokenizer) -> dict:
    from spikelm.eval import perplexity, token_nll
    from spikelm.eval.loading import UserError, check_sparse_flags, training_length

    ids = _tokens(tokenizer, args.text, args.max_tokens)
    context = args.context if args.context is not None else (training_length(args.model, args.revision) or 512)
    if context < 0:
        raise UserError(f"--context must be >= 0, got {context}")
    if context == 1:
        raise UserError("--context must be >= 2 tokens (or 0 for the whole text as one stream)")
    if ids.numel() < 2:
        raise UserError(f"--text_file {args.text_file}: needs at least 2 tokens, has {ids.numel()}")
    if context == 0 or context >= ids.numel():
        windows = [ids]
    else:
        # consecutive windows share one token, so every token after the first is scored exactly once
        # (the text's tail included), each with 1..context-1 tokens of context
        windows = [ids[s:s + context] for s in range(0, ids.numel() - 1, context - 1)]
    check_sparse_flags(args.sparse, args.int8, next(model.parameters()).device)
    if args.int8 and args.sparse == "auto" and args.mode == "parallel":
        raise UserError("--int8 --sparse auto in parallel mode scores with the float product (auto is sparse only on "
                        "calls of <= 16 rows): give --sparse on, or --mode streaming for decoding's own calls")
    if hasattr(model, "set_sparse_inference"):
        model.set_sparse_inference(args.sparse, int8=args.int8)
    elif args.sparse != "auto" or args.int8:
        raise UserError(f"--sparse {args.sparse}{' --int8' if args.int8 else ''}: this model has no sparse product")
    chunk = args.chunk_size if args.chunk_size is not None else (1 if args.mode == "streaming" else None)
    if chunk is None and context == 0:
        chunk = 2048 if model.model.supports_cache else None  # bound memory on a long file
    from spikelm.ops.spike_linear import kernel_calls, kernel_calls_since

    t = time.perf_counter()
    calls_before = kernel_calls()
    nll = __import__("torch").cat([token_nll(model, w, args.mode, chunk) for w in windows])
    calls = kernel_calls_since(calls_before)
    return {"perplexity": perplexity(nll), "unigram_ppl_of_text": unigram_perplexity(ids[None, 1:]),
            "nll": float(nll.mean()), "scored_tokens": int(nll.numel()),
            "windows": len(windows), "context": int(max(w.numel() for w in windows)), "mode": args.mode,
            "chunk_size": chunk, "sparse": args.sparse, "int8": args.int8,
            "spike_linear_calls": calls, "seconds": time.perf_counter() - t}


def cmd_position(args, model, tokenizer) -> dict:
    from spikelm.eval import evaluate_by_position, split_windows
    from spikelm.eval.loading import UserError, training_length

    train_len = args.train_len or training_length(args.model, args.revision)
    if not train_len:
        raise UserError("--train_len is needed: the model folder does not record its training block size "
                        "(no run_config.json with block_size)")
    if train_len < 1 or args.multiple <= 0 or args.windows < 1:
        raise UserError("--train_len, --multiple and --windows must be positive")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("parallel", "streaming")]
    if bad or not modes:
        raise UserError(f"--modes takes parallel and/or streaming, got {args.modes!r}")
    if "streaming" in modes and not model.model.supports_cache:
        raise UserError("a PSN model keeps no state: use --modes parallel")
    length = int(round(args.multiple * train_len)) + 1  # +1: the last position predicts a token too
    ids = _tokens(tokenizer, args.text, args.max_tokens)
    try:
        windows = split_windows(ids, length, args.windows, args.stride)
    except ValueError as e:
        raise UserError(f"--text_file {args.text_file}: {e} (= {args.multiple} x {train_len} + 1)") from None
    bucket = args.bucket_size or max(1, train_len // 2)
    t = time.perf_counter()
    result = evaluate_by_position(model, windows, modes, bucket_size=bucket,
                                  chunk_size={"parallel": args.parallel_chunk, "streaming": args.stream_chunk},
                                  train_len=train_len, progress=lambda m: print(f"[evaluate] {m}", file=sys.stderr))
    result["stride"] = args.stride or length
    result["unigram_ppl_of_text"] = unigram_perplexity(windows[:, 1:])
    result["seconds"] = time.perf_counter() - t
    if args.out_png:
        from spikelm.eval.plots import plot_perplexity_by_position

        Path(args.out_png).parent.mkdir(parents=True, exist_ok=True)
        plot_perplexity_by_position(result, args.out_png,
                                    f"{Path(args.model).name}: perplexity by position "
                                    f"({windows.shape[0]} windows of {length - 1} tokens)")
    return result


def cmd_spikes(args, model, tokenizer) -> dict:
    from spikelm.eval import spiking_analysis, unfolding_check
    from spikelm.eval.loading import UserError
    from spikelm.eval.sparsity import sparsity_analysis

    if args.tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {args.tokens}")
    ids = _tokens(tokenizer, args.text, args.max_tokens)[: args.tokens]
    if ids.numel() < 1:
        raise UserError(f"--text_file {args.text_file}: no tokens")
    try:
        result = spiking_analysis(model, ids[None], args.mac_pj, args.ac_pj)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not args.no_unfold_check:
        result["unfolding_check"] = unfolding_check(model, ids[None])
    result["sparse_inference"] = sparsity_analysis(model, ids[None])
    if args.out_png:
        from spikelm.eval.plots import plot_spiking_analysis

        Path(args.out_png).parent.mkdir(parents=True, exist_ok=True)
        plot_spiking_analysis(result, args.out_png, f"{Path(args.model).name}: {ids.numel()} tokens")
    return result


def main(argv=None) -> int:
    import shlex

    command = "python evaluate.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    args = parse_args(argv)
    from spikelm.eval.loading import UserError, load_model, read_text_file

    try:
        if args.max_tokens is not None and args.max_tokens < 2:
            raise UserError(f"--max_tokens must be >= 2, got {args.max_tokens}")
        args.text = read_text_file(args.text_file)
        model, tokenizer = load_model(args.model, args.device, args.dtype, revision=args.revision)
        device = next(model.parameters()).device
        result = {"ppl": cmd_ppl, "position": cmd_position, "spikes": cmd_spikes}[args.command](args, model, tokenizer)
    except UserError as e:
        print(f"evaluate.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    result = {"meta": _meta(args, model, device, command), **result}
    text = json.dumps(result, indent=1)
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
