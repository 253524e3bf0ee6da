"""How many of a SpikeLM's linear-layer inputs are non-zero: what the spike-sparse products (ops.spike_matmul in
training, ops.spike_linear in decoding) get to skip.

One forward over --batch x --block tokens of a text file records, for every SpikeLinear, the fraction of its
input entries that are non-zero; the model-wide figure weights each layer by its weight count (in x out).
--init measures the saved config freshly initialised (seed 0) instead of the saved weights.

    python benchmarks/linear_input_density.py --model runs/tiny [--init] [--out results.json]

Prints a table and writes a JSON (default benchmarks/results/linear_input_density.json; --append adds this run
to the file's list instead of replacing it).
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench_train_step import load_spikelm  # noqa: E402

from spikelm.layers import SpikeLinear  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--init", action="store_true")
    ap.add_argument("--text", type=Path, default=HERE.parent / "data" / "paradise_lost_train.txt")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "linear_input_density.json")
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tokenizer, model = load_spikelm(args.model, args.init)
    model.eval()
    n = args.batch * args.block
    ids = torch.tensor(tokenizer(args.text.read_text(encoding="utf-8")[: 40 * n])["input_ids"][:n])
    if ids.numel() < n:
        raise SystemExit(f"{args.text}: {ids.numel()} tokens, fewer than {n}")
    layers = {}

    def hook(name):
        def record(module, inputs):
            x = inputs[0]
            layers[name] = {"density": float((x != 0).float().mean()), "in": module.in_features,
                            "out": module.out_features}
        return record

    for name, module in model.named_modules():
        if isinstance(module, SpikeLinear):
            module.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        model(input_ids=ids.view(args.batch, args.block))
    weights = sum(v["in"] * v["out"] for v in layers.values())
    weighted = sum(v["density"] * v["in"] * v["out"] for v in layers.values()) / weights
    print(f"{args.model}{' (fresh weights)' if args.init else ''}: weighted density {weighted:.3f}")
    print("| layer | in -> out | density |\n| --- | --- | ---: |")
    for name, v in layers.items():
        print(f"| {name} | {v['in']} -> {v['out']} | {v['density']:.3f} |")
    run = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": str(args.model),
           "init": args.init, "tokens": n, "text": str(args.text), "weighted_density": weighted, "layers": layers}
    runs = json.loads(args.out.read_text())["runs"] if args.append and args.out.exists() else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": runs + [run]}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
