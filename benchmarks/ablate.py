"""Architecture and recipe ablations through train.py: each row is a set of train.py flags on a fixed base.

    python benchmarks/ablate.py list
    python benchmarks/ablate.py run --size tiny --row head_n16 [--seed 42]
    python benchmarks/ablate.py table            # -> benchmarks/results/ablation_v2.md (+ .json)

Sizes (the base config each row's flags go on top of; a base never changes, so every row reruns):
  tiny        benchmarks/configs/ablation_tiny.yaml: configs/tiny.yaml before the ablation (1.21M
              parameters, config_version 1), Paradise Lost as one document, 600 steps of 8 x 128
  corpus10m   benchmarks/configs/ablation_corpus_10m.yaml: a ~10M SpikeLM on the benchmark corpus
              (benchmarks/build_corpus.py), 6 SSM blocks of hidden 320, BPE 4096
Rows whose `model` is a Llama run benchmarks/train_llama_reference.py with the same flags (a Llama of
the row's SpikeLM's parameter count); `plain` rows run benchmarks/train_plain.py (random windows).

Each run writes benchmarks/results/ablation_v2/<size>/<row>-s<seed>.json: the validation loss train.py
reports at the end (its validation blocks of the base), the training-loop time (sum of train.py's
logged windows: tokens / tokens_per_s, evaluation excluded) and the CPU time of the whole run (on a
shared machine the wall time mostly measures the other jobs), the load average before and after,
parameters, the firing rate on the validation blocks, and the exact command. Runs go under
benchmarks/.runs/ablation/ (not in git).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "ablation_v2"
RUNS = HERE / ".runs" / "ablation"
SIZES = {"tiny": HERE / "configs" / "ablation_tiny.yaml", "corpus10m": HERE / "configs" / "ablation_corpus_10m.yaml"}

# name: (what the row changes, train.py flags, model)
ROWS: dict[str, tuple[str, list[str], str]] = {
    "base": ("config_version 1 defaults, the text as one document", [], "spikelm"),
    "paragraph": ("documents = blank-line paragraphs (tiny.yaml before): every state resets at each", ["--sample_by", "paragraph"], "spikelm"),
    "head_n16": ("N = 16 for the neuron the LM head reads", ["--head_max_spike", "16"], "spikelm"),
    "n8": ("N = 8 everywhere", ["--max_spike", "8"], "spikelm"),
    "n8_scale4": ("N = 8 everywhere, neuron input gain 4", ["--max_spike", "8", "--neuron_input_scale", "4"], "spikelm"),
    "core_long": ("SSM core decays start at [0.5, 0.99]", ["--core_decay_init_range", "[0.5, 0.99]"], "spikelm"),
    "gate_integer": ("SSM gate fires integer spikes (rect)", ["--ssm_gate", "integer"], "spikelm"),
    "atan": ("atan surrogate (alpha 2) for every neuron: gradient below 0 too", ["--surrogate", "atan"], "spikelm"),
    "atan_a1": ("atan surrogate, alpha 1 (wider), every neuron", ["--surrogate", "atan", "--surrogate_alpha", "1.0"],
                "spikelm"),
    "atan_a05": ("atan surrogate, alpha 0.5 (wider still), every neuron",
                 ["--surrogate", "atan", "--surrogate_alpha", "0.5"], "spikelm"),
    "atan_a1_gate_integer": ("atan alpha 1, and the SSM gate fires integer spikes",
                             ["--surrogate", "atan", "--surrogate_alpha", "1.0", "--ssm_gate", "integer"], "spikelm"),
    "atan_gate_integer": ("atan surrogate (alpha 2) for every neuron, and the SSM gate fires integer spikes",
                          ["--surrogate", "atan", "--ssm_gate", "integer"], "spikelm"),
    "atan_gate_integer_n8": ("atan surrogate, integer SSM gate, N = 8 everywhere",
                             ["--surrogate", "atan", "--ssm_gate", "integer", "--max_spike", "8"], "spikelm"),
    "atan_a1_n8": ("atan alpha 1, and N = 8 everywhere",
                   ["--surrogate", "atan", "--surrogate_alpha", "1.0", "--max_spike", "8"], "spikelm"),
    "lr5e-3": ("learning rate 5e-3", ["--learning_rate", "5e-3"], "spikelm"),
    "atan_a1_lr5e-3": ("atan alpha 1, learning rate 5e-3",
                       ["--surrogate", "atan", "--surrogate_alpha", "1.0", "--learning_rate", "5e-3"], "spikelm"),
    "atan_a1_gate_integer_lr5e-3": ("atan alpha 1, integer SSM gate, learning rate 5e-3",
                                    ["--surrogate", "atan", "--surrogate_alpha", "1.0", "--ssm_gate", "integer",
                                     "--learning_rate", "5e-3"], "spikelm"),
    "v2_lr5e-3": ("config_version 2's defaults (atan surrogate, integer SSM gate) and learning rate 5e-3: "
                  "configs/tiny.yaml before the v2_* rows below", ["--config_version", "2", "--learning_rate", "5e-3"], "spikelm"),
    "v2_n8_lr5e-3": ("v2_lr5e-3, N = 8 everywhere",
                     ["--config_version", "2", "--learning_rate", "5e-3", "--max_spike", "8"], "spikelm"),
    "v2_a1_lr5e-3": ("v2_lr5e-3, atan alpha 1 (wider)",
                     ["--config_version", "2", "--learning_rate", "5e-3", "--surrogate_alpha", "1.0"], "spikelm"),
    "v2_a1_n8_lr5e-3": ("v2_lr5e-3, atan alpha 1, N = 8 everywhere",
                        ["--config_version", "2", "--learning_rate", "5e-3", "--surrogate_alpha", "1.0",
                         "--max_spike", "8"], "spikelm"),
    "v2_a1_n16_lr5e-3": ("v2_lr5e-3, atan alpha 1, N = 16 everywhere",
                         ["--config_version", "2", "--learning_rate", "5e-3", "--surrogate_alpha", "1.0",
                          "--max_spike", "16"], "spikelm"),
    "v2_a1_n8_lr7e-3": ("v2_a1_n8_lr5e-3 at learning rate 7e-3",
                        ["--config_version", "2", "--learning_rate", "7e-3", "--surrogate_alpha", "1.0",
                         "--max_spike", "8"], "spikelm"),
    "v2_a1_n8_lr1e-2": ("v2_a1_n8_lr5e-3 at learning rate 1e-2: configs/tiny.yaml now",
                        ["--config_version", "2", "--learning_rate", "1e-2", "--surrogate_alpha", "1.0",
                         "--max_spike", "8"], "spikelm"),
    "v2_a1_n8_lr1.5e-2": ("v2_a1_n8_lr5e-3 at learning rate 1.5e-2",
                          ["--config_version", "2", "--learning_rate", "1.5e-2", "--surrogate_alpha", "1.0",
                           "--max_spike", "8"], "spikelm"),
    "llama_standard": ("Llama, standard proportions, same parameters", [], "llama_standard"),
    "llama_standard_lr5e-3": ("Llama, standard proportions, same parameters, learning rate 5e-3",
                              ["--learning_rate", "5e-3"], "llama_standard"),
    "llama_standard_lr2e-3": ("Llama, standard proportions, same parameters, learning rate 2e-3",
                              ["--learning_rate", "2e-3"], "llama_standard"),
    "llama_same_depth": ("Llama, SpikeLM's depth, MLP widened", [], "llama_same_depth"),
    "llama_same_depth_lr2e-3": ("Llama, SpikeLM's depth, MLP widened, learning rate 2e-3",
                                ["--learning_rate", "2e-3"], "llama_same_depth"),
    "plain": ("the base SpikeLM through a plain random-window loop", [], "plain"),
}


def result_path(size: str, row: str, seed: int) -> Path:
    return RESULTS / size / f"{row}-s{seed}.json"


def command_for(size: str, row: str, seed: int, out: Path) -> list[str]:
    what, flags, model = ROWS[row]
    common = ["--config", str(SIZES[size].relative_to(ROOT)), *flags, "--seed", str(seed)]
    if model == "plain":
        return [sys.executable, "benchmarks/train_plain.py", *common, "--result", str(out / "plain.json")]
    run = ["--output_dir", str(out.relative_to(ROOT)), "--overwrite_output_dir"]
    if model.startswith("llama"):
        return [sys.executable, "benchmarks/train_llama_reference.py", "--llama_shape", model.split("_", 1)[1],
                *common, *run]
    return [sys.executable, "train.py", *common, *run]


def train_seconds(out: Path) -> float:
    """Training-loop time from train.py's log: each logged window's tokens / its tokens_per_s."""
    rows = list(csv.DictReader(open(out / "logs" / "train.csv")))
    total, last_tokens = 0.0, 0
    for r in rows:
        tokens = int(float(r["tokens"]))
        total += (tokens - last_tokens) / float(r["tokens_per_s"])
        last_tokens = tokens
    return total


def evaluate_saved(out: Path, size: str, seed: int, loss: bool) -> dict:
    """On the base's validation blocks (the whole text as one document): the firing of a trained SpikeLM
    (mean rate and spike events per neuron-step, 16 blocks) and, if `loss`, train.py's validation loss
    (for rows that change how train.py splits the data, whose own final eval reads other blocks)."""
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import spikelm.training.trainer as trainer
    from spikelm.eval import FiringRateMonitor
    from spikelm.models import SpikeLMForCausalLM
    from spikelm.training import parse_args

    torch.set_num_threads(1)
    spiking = json.loads((out / "config.json").read_text())["model_type"] == "spikelm"
    model = (SpikeLMForCausalLM if spiking else AutoModelForCausalLM).from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    args = parse_args(["--config", str(SIZES[size]), "--output_dir", "unused", "--seed", str(seed)])
    acc = Accelerator()
    raw = trainer.build_data(args, acc)
    _, blocks = trainer.pack_splits(args, {"train": raw["validation"], "validation": raw["validation"]}, tok, acc)
    res = {}
    if loss:
        res["val_loss"] = trainer.evaluate(model, blocks, args, acc)["loss"]
    if spiking:
        ids = torch.stack([torch.as_tensor(blocks[i]["input_ids"]) for i in range(min(16, len(blocks)))])
        with torch.no_grad(), FiringRateMonitor(model) as mon:
            model(input_ids=ids, use_cache=False)
        layers = mon.layer_rates()
        events = sum(v["spikes"] for v in layers.values()) / sum(v["elements"] for v in layers.values())
        res["firing"] = {"mean_rate": mon.mean_rate(), "events_per_neuron_step": events,
                         "layers": {k: round(v["rate"], 4) for k, v in layers.items()}}
    return res


def run(size: str, row: str, seed: int) -> dict:
    out = RUNS / size / f"{row}-s{seed}"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = command_for(size, row, seed, out)
    load0, t0 = os.getloadavg(), time.time()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = out.parent / f"{row}-s{seed}.log"
    print("running:", " ".join(cmd), flush=True)
    with open(log, "w") as f:
        subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, check=True)
    wall, load1 = time.time() - t0, os.getloadavg()
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    model = ROWS[row][2]
    res = {"size": size, "row": row, "what": ROWS[row][0], "seed": seed, "model": model,
           "command": " ".join(["python", *cmd[1:]]), "loadavg_before": load0, "loadavg_after": load1,
           "wall_seconds": wall, "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           # CPU time of the whole run (data, training, evaluation): on a shared machine wall times mostly
           # measure the other jobs
           "cpu_seconds": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)}
    if model == "plain":
        p = json.loads((out / "plain.json").read_text())
        res.update(val_loss=p["final_eval"]["loss"], train_seconds=p["train_seconds"], parameters=p["parameters"])
    else:
        s = json.loads((out / "train_summary.json").read_text())
        res.update(val_loss=s["final_eval"]["loss"], train_seconds=train_seconds(out), parameters=s["parameters"])
        ref = out / "reference.json"
        if ref.exists():
            res["reference"] = json.loads(ref.read_text()).get("reference")
        data_flags = any(f in ROWS[row][1] for f in ("--sample_by", "--document_start_pattern", "--document_separator"))
        if data_flags:
            res["train_py_val_loss"] = res["val_loss"]  # on the row's own validation blocks
        res.update(evaluate_saved(out, size, seed, loss=data_flags))
    path = result_path(size, row, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"{size} {row} seed {seed}: val loss {res['val_loss']:.4f}, {res['train_seconds']:.0f}s training "
          f"(load {load0[0]:.1f} -> {load1[0]:.1f})", flush=True)
    return res


# where a row's description at tiny does not fit another size
SIZE_DESCRIPTIONS = {
    ("corpus10m", "base"): "config_version 1 defaults, the corpus's documents (one per JSONL row)",
    ("corpus10m", "v2_a1_n8_lr1e-2"): "configs/tiny.yaml's recipe: version 2, atan alpha 1, N = 8, learning rate 1e-2",
}


def table() -> str:
    import math

    results: dict = {}
    for p in sorted(RESULTS.glob("*/*.json")):
        r = json.loads(p.read_text())
        results.setdefault((r["size"], r["row"]), []).append(r)
    lines = ["| size | row | change | seeds | val loss (each seed) | mean | ppl | vs base | params | train s (load) "
             "| firing rate | events/neuron-step |", "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |"]
    base = {size: sum(r["val_loss"] for r in rs) / len(rs) for (size, row), rs in results.items() if row == "base"}
    order = {name: i for i, name in enumerate(ROWS)}
    for (size, row), rs in sorted(results.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 999))):
        rs = sorted(rs, key=lambda r: r["seed"])
        mean = sum(r["val_loss"] for r in rs) / len(rs)
        fire = [r["firing"] for r in rs if r.get("firing")]
        rate = f"{sum(f['mean_rate'] for f in fire) / len(fire):.3f}" if fire else "-"
        ev = f"{sum(f['events_per_neuron_step'] for f in fire) / len(fire):.3f}" if fire else "-"
        delta = f"{mean - base[size]:+.4f}" if size in base and row != "base" else "-"
        times = ", ".join(f"{r['train_seconds']:.0f} ({r['loadavg_before'][0]:.1f})" for r in rs)
        what = SIZE_DESCRIPTIONS.get((size, row)) or ROWS.get(row, ("?",))[0]
        lines.append(f"| {size} | {row} | {what} | {len(rs)} | "
                     + ", ".join(f"{r['val_loss']:.4f}" for r in rs) + f" | {mean:.4f} | {math.exp(mean):.1f} | {delta} | "
                     f"{rs[0]['parameters'] / 1e6:.3f}M | {times} | {rate} | {ev} |")
    commands = sorted({(r["size"], r["row"], r["command"]) for rs in results.values() for r in rs})
    md = "\n".join(lines) + "\n\nCommands (one per row and seed):\n\n" + "\n".join(
        f"- {size} {row}: `{cmd}`" for size, row, cmd in commands) + "\n"
    (HERE / "results" / "ablation_v2_table.md").write_text(md)
    (HERE / "results" / "ablation_v2.json").write_text(json.dumps({f"{k[0]}/{k[1]}": v for k, v in results.items()},
                                                                   indent=1) + "\n")
    print(md)
    return md


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    r = sub.add_parser("run")
    r.add_argument("--size", choices=sorted(SIZES), required=True)
    r.add_argument("--row", choices=sorted(ROWS), required=True, nargs="+")
    r.add_argument("--seed", type=int, default=42)
    sub.add_parser("table")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for name, (what, flags, model) in ROWS.items():
            print(f"{name:20s} {model:16s} {' '.join(flags):50s} {what}")
    elif args.cmd == "run":
        for row in args.row:
            run(args.size, row, args.seed)
    else:
        table()


if __name__ == "__main__":
    main()
