#!/usr/bin/env python
"""An OpenAI-compatible streaming server for a saved SpikeLM model: every conversation's state has a fixed size.

    python serve.py --model runs/tiny/final                     # http://127.0.0.1:8000 (playground at /)
    python serve.py --model DIR --port 9000 --api_key SECRET --max_batch 32 --threads 2

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream or not),
GET /health, GET and DELETE /v1/sessions/{id}; the playground at /. Any OpenAI client works:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="SECRET")
    client.chat.completions.create(model="final", messages=[{"role": "user", "content": "Hello"}])

States (the prefix cache and sessions) are saved under --state_dir and survive a restart, even kill -9.
docs/serving.md describes the API, its extensions and the guarantees.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="folder written by save_pretrained (model + tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served_model_name", default=None, help="the model's name in the API (default: the folder's name)")
    p.add_argument("--api_key", default=os.environ.get("SPIKELM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health and / (default: "
                        "$SPIKELM_API_KEY; none: no key needed)")
    p.add_argument("--state_dir", default=None,
                   help="where states are saved (default: MODEL/serve_states if writable, else "
                        "~/.cache/spikelm/serve_states/<model fingerprint>)")
    p.add_argument("--state_memory_mb", type=float, default=1024, help="states held in RAM; the rest wait on disk")
    p.add_argument("--state_disk_mb", type=float, default=None,
                   help="prefix states kept on disk; the least recently used beyond it are deleted (default: no limit; "
                        "sessions are never deleted but by their client)")
    p.add_argument("--max_sessions", type=int, default=10000, help="sessions the server keeps (a new one beyond is a 429)")
    p.add_argument("--no_prefix_cache", action="store_true",
                   help="read every prompt from the start (sessions still keep their state)")
    p.add_argument("--max_batch", type=int, default=64, help="requests decoded together; more wait in a queue")
    p.add_argument("--prefill_chunk", type=int, default=256,
                   help="prompt tokens read per scheduler step while other requests decode (bounds their stall)")
    p.add_argument("--chunk_size", type=int, default=1024, help="most prompt tokens in one parallel forward")
    p.add_argument("--max_prompt_tokens", type=int, default=32768, help="longest prompt accepted (a 400 beyond)")
    p.add_argument("--default_max_tokens", type=int, default=256, help="max_tokens of a request that gives none")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 (auto: as saved)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--sparse", choices=("auto", "on", "off"), default="auto",
                   help="sparse spike decoding, where the model supports it (model.set_sparse_inference)")
    p.add_argument("--int8", action="store_true",
                   help="with --sparse auto|on: the sparse product reads int8 weights with one scale per output feature")
    p.add_argument("--log_level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument("--access_log", action="store_true", help="log every HTTP request")
    return p.parse_args(argv)


def default_state_dir(model_dir: str, fingerprint: str) -> Path:
    folder = Path(model_dir)
    if folder.is_dir() and os.access(folder, os.W_OK):
        return folder / "serve_states"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "spikelm" / "serve_states" / fingerprint[:16]


def build(args: argparse.Namespace):
    """(app, description) for parsed arguments; raises UserError naming a bad flag or model folder."""
    from spikelm.eval.loading import UserError, check_sparse_flags, load_model, resolve_device

    for name in ("max_batch", "prefill_chunk", "chunk_size", "max_prompt_tokens", "default_max_tokens",
                 "max_sessions"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be in 1..65535, got {args.port}")
    check_sparse_flags(args.sparse, args.int8, resolve_device(args.device))
    try:
        from spikelm.serving.app import create_app
    except ImportError as e:
        raise UserError(f"serve.py needs the serve extra: pip install -e '.[serve]' ({e})") from None
    import torch

    from spikelm.serving import Engine, StateStore, model_fingerprint

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    if not model.model.supports_cache:
        raise UserError(f"--model {args.model}: a PSN model keeps no state between tokens; it cannot be served "
                        "in constant memory")
    log = logging.getLogger("spikelm.serving")
    if hasattr(model, "set_sparse_inference"):
        model.set_sparse_inference(args.sparse, int8=args.int8)
    elif args.sparse != "auto" or args.int8:
        log.warning(f"--sparse {args.sparse}{' --int8' if args.int8 else ''}: this model has no sparse decoding; "
                    "ignored")
    fingerprint = model_fingerprint(model)
    state_dir = Path(args.state_dir) if args.state_dir else default_state_dir(args.model, fingerprint)
    try:
        store = StateStore(state_dir, fingerprint, memory_budget=int(args.state_memory_mb * 2**20),
                           disk_budget=None if args.state_disk_mb is None else int(args.state_disk_mb * 2**20),
                           max_sessions=args.max_sessions)
    except OSError as e:
        raise UserError(f"--state_dir {state_dir}: {e}") from None
    engine = Engine(model, tokenizer, store, max_batch=args.max_batch, prefill_chunk=args.prefill_chunk,
                    chunk_size=args.chunk_size, prefix_cache=not args.no_prefix_cache)
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(engine, store, tokenizer, name, api_key=args.api_key, max_prompt_tokens=args.max_prompt_tokens,
                     default_max_tokens=args.default_max_tokens)
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    return app, f"{name} ({n_params:.1f}M parameters), states in {state_dir}"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from spikelm.eval.loading import UserError

    try:
        app, description = build(args)
    except UserError as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    logging.getLogger("spikelm.serving").info(f"serving {description} on http://{args.host}:{args.port}")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
