"""lm-evaluation-harness on the local held-out tasks, for SpikeLM and reference models, as users would run it.

    python benchmarks/bench_lm_eval.py --models spikelm=runs/tiny llama=runs/tiny-llama \
        --out benchmarks/results/lm_eval_tiny.json

Each model folder is scored by the `lm_eval` command itself (`--model hf --model_args
pretrained=DIR,trust_remote_code=True,max_length=L`) on the tasks in benchmarks/lm_eval_tasks
(built from data/paradise_lost_heldout.txt, never trained on by configs/tiny.yaml):
  spikelm_heldout_ppl         rolling perplexity of each verse paragraph
  spikelm_heldout_stream_ppl  rolling perplexity of the whole held-out text
  spikelm_heldout_lastword    the last word of a verse line from the lines before it (acc, perplexity)
L is each model's training block size (run_config.json in its folder), so every model is scored in
windows of the length it was trained at; `--stream` adds a SpikeLM row without max_length (one window
over a whole document: what a streaming model can do that a fixed-context one cannot).
Prints a table and writes JSON (+ a markdown table beside it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("spikelm_heldout_ppl", "spikelm_heldout_stream_ppl", "spikelm_heldout_lastword")
METRICS = (("spikelm_heldout_ppl", "word_perplexity,none", "para word ppl"),
           ("spikelm_heldout_ppl", "bits_per_byte,none", "para bits/byte"),
           ("spikelm_heldout_stream_ppl", "word_perplexity,none", "text word ppl"),
           ("spikelm_heldout_lastword", "acc,none", "last-word acc"),
           ("spikelm_heldout_lastword", "perplexity,none", "last-word ppl"))


def block_size(folder: Path) -> int | None:
    f = folder / "run_config.json"
    if not f.is_file():
        return None
    data = json.loads(f.read_text())
    return (data.get("args") or data.get("identity") or data).get("block_size")


def parameters(folder: Path) -> int:
    """Distinct parameters (a tied LM head counted once), from the model as transformers loads it."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).num_parameters()


def run_lm_eval(folder: Path, max_length: int | None, tasks, limit: int | None, batch_size: int) -> dict:
    args = f"pretrained={folder},trust_remote_code=True" + (f",max_length={max_length}" if max_length else "")
    with tempfile.TemporaryDirectory() as out:
        exe = Path(sys.executable).with_name("lm_eval")
        cmd = [str(exe) if exe.exists() else "lm_eval", "--model", "hf", "--model_args", args,
               "--include_path", "benchmarks/lm_eval_tasks", "--tasks", ",".join(tasks),
               "--batch_size", str(batch_size), "--output_path", out]
        if limit:
            cmd += ["--limit", str(limit)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"lm_eval failed on {folder}:\n{proc.stderr[-4000:]}")
        results = json.loads(next(Path(out).rglob("results_*.json")).read_text())["results"]
    return {"command": " ".join(cmd[:-2]), "seconds": time.perf_counter() - t0, "results": results}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", required=True, help="NAME=FOLDER pairs (saved models with tokenizers)")
    p.add_argument("--stream", default="spikelm", help="comma-separated names also scored without max_length")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/lm_eval.json")
    args = p.parse_args(argv)

    rows = []
    for spec in args.models:
        name, _, folder = spec.partition("=")
        folder = Path(folder).resolve()
        L = block_size(folder)
        runs = [(name, L)] + ([(f"{name} (no max_length)", None)] if name in args.stream.split(",") else [])
        for label, max_length in runs:
            print(f"[lm_eval] {label}: {folder} max_length={max_length}", flush=True)
            r = run_lm_eval(folder, max_length, TASKS, args.limit, args.batch_size)
            rows.append({"model": label, "folder": str(folder), "parameters": parameters(folder),
                         "max_length": max_length, **r})

    header = ["model", "params", "max_length"] + [m[2] for m in METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        vals = [r["results"].get(task, {}).get(key) for task, key, _ in METRICS]
        cells = [r["model"], f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] else "?",
                 str(r["max_length"] or "-")] + ["-" if v is None else f"{v:.4g}" for v in vals]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "loadavg": os.getloadavg(),
            "command": " ".join([sys.executable, *sys.argv])}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(f"{table}\n\n{meta['date']}, `{meta['command']}`\n")


if __name__ == "__main__":
    main()
