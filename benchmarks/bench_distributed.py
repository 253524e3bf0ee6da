"""One process against 2 CPU processes (gloo) under DDP and FSDP2, at the same global batch.

    python benchmarks/bench_distributed.py            # tiny.yaml at hidden 64, 10 steps

Runs train.py three times with the same global batch of 8 blocks: one process with 2 gradient
accumulation steps of 4 blocks, and `accelerate launch` with 2 processes of 4 blocks each, once as
DDP (--multi_gpu) and once as FSDP2 (--use_fsdp --fsdp_version 2); prints the largest differences of
the training and validation losses and of the final weights against the one-process run, and writes
benchmarks/results/distributed_cpu.json.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distributed_cpu.json"
COMMON = ["--config", "configs/tiny.yaml", "--hidden_size", "64", "--num_attention_heads", "2", "--block_size", "64",
          "--max_steps", "10", "--warmup_steps", "2", "--logging_steps", "1", "--eval_steps", "5", "--save_steps", "5",
          "--max_eval_samples", "16", "--disable_tqdm", "--num_threads", "1", "--sample_prompt", "null",
          "--per_device_train_batch_size", "4"]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]
MODES = {"single": ([sys.executable], ["--gradient_accumulation_steps", "2"]),
         "ddp": (LAUNCH + ["--multi_gpu"], ["--gradient_accumulation_steps", "1"]),
         "fsdp": (LAUNCH + ["--use_fsdp", "--fsdp_version", "2"], ["--gradient_accumulation_steps", "1"])}


def run(mode: str, out: Path) -> dict:
    launcher, extra = MODES[mode]
    cmd = launcher + ["train.py"] + COMMON + extra + ["--output_dir", str(out)]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    load, t0 = os.getloadavg()[0], time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-4000:]}")
    prefix = "python" if mode == "single" else "ACCELERATE_USE_CPU=1 accelerate launch " + shlex.join(launcher[3:])
    shown = prefix + " " + shlex.join(cmd[len(launcher):])
    return {"command": shown.replace(str(out), f"/tmp/{mode}"), "wall_s": time.perf_counter() - t0,
            "loadavg_1min_before": load, "train": _column(out / "logs" / "train.csv"),
            "eval": _column(out / "logs" / "eval.csv"), "out": out}


def _column(path: Path) -> dict[int, float]:
    with open(path, newline="") as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def _weights_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(wa) == sorted(wb), (sorted(set(wa) ^ set(wb)))
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {m: run(m, Path(tmp) / m) for m in MODES}
        ref = runs["single"]
        report = {"what": "one process (2 accumulation steps x 4 blocks) vs 2 CPU processes (gloo) x 4 blocks, DDP and "
                          "FSDP2; global batch 8 blocks x 64 tokens, 10 steps",
                  "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), "torch_threads_per_process": 1,
                  "runs": {}}
        print(f"{'run':8s} {'max |train loss diff|':>22s} {'max |eval loss diff|':>21s} {'max |weight diff|':>18s} "
              f"{'wall s':>7s} {'load':>5s}")
        for m, r in runs.items():
            entry = {k: r[k] for k in ("command", "wall_s", "loadavg_1min_before")}
            entry["train_loss"], entry["eval_loss"] = r["train"], r["eval"]
            if m != "single":
                entry["max_abs_train_loss_diff"] = max(abs(r["train"][s] - ref["train"][s]) for s in ref["train"])
                entry["max_abs_eval_loss_diff"] = max(abs(r["eval"][s] - ref["eval"][s]) for s in ref["eval"])
                entry["max_abs_weight_diff"] = _weights_diff(ref["out"], r["out"])
            report["runs"][m] = entry
            d = [entry.get(f"max_abs_{k}_diff", 0.0) for k in ("train_loss", "eval_loss", "weight")]
            print(f"{m:8s} {d[0]:22.3g} {d[1]:21.3g} {d[2]:18.3g} {r['wall_s']:7.1f} {r['loadavg_1min_before']:5.2f}")
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
