"""Atomic checkpoints: write everything into a hidden temp folder, fsync, then one rename.

A kill at any moment leaves either the old set of checkpoints or the old set plus the new one;
a half-written folder is only ever `.tmp-checkpoint-*` (ignored, removed on the next start), and an
old checkpoint is renamed to `.trash-*` before it is deleted.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
RUN_FILE = "run_config.json"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / "config.json").is_file()


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints in output_dir, oldest first."""
    out = []
    d = Path(output_dir)
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = CKPT_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(output_dir) -> Path | None:
    ck = list_checkpoints(output_dir)
    return ck[-1][1] if ck else None


def clean_partial(output_dir) -> list[str]:
    """Finish or undo a killed save, then remove its leftovers (temp and trash folders).

    A kill while re-saving an existing step can leave checkpoint-N missing, its new version complete
    in .tmp-checkpoint-N and its old one in .trash-checkpoint-N-*: the complete one is put back
    first (the new one if it was finished, else the old one), so no checkpoint is ever lost.
    """
    removed = []
    d = Path(output_dir)
    if not d.is_dir():
        return removed
    for p in sorted(d.iterdir()):
        if p.is_dir() and p.name.startswith(".tmp-checkpoint-"):
            final = d / p.name[len(".tmp-"):]
            if not final.exists() and (p / STATE_FILE).exists():
                os.replace(p, final)  # the new version was complete: finish the swap
    for p in sorted(d.iterdir()):
        if p.is_dir() and p.name.startswith(".trash-checkpoint-"):
            final = d / p.name[len(".trash-"):].rsplit("-", 1)[0]
            if not final.exists() and (p / STATE_FILE).exists():
                os.replace(p, final)  # nothing newer made it: restore the old version
    for p in d.iterdir():
        if p.is_dir() and (p.name.startswith(".tmp-checkpoint-") or p.name.startswith(".trash-")):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(accelerator, output_dir, step: int, model, tokenizer, optimizer, scheduler, state: dict,
                    save_total_limit: int | None = None) -> Path:
    """Write output_dir/checkpoint-STEP atomically (all processes call this)."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    optim_state = optimizer.state_dict()  # collective under FSDP, so every process calls it
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pth")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        pause = float(os.environ.get("SPIKELM_FAULT_CHECKPOINT_SLEEP", "0") or 0)  # tests kill -9 in here
        if pause:
            print(f"[fault] pausing {pause}s inside the checkpoint write of step {step}", flush=True)
            time.sleep(pause)
        with open(tmp / STATE_FILE, "w") as f:  # written last: marks the folder complete
            json.dump(state, f, indent=1)
        _fsync_tree(tmp)
        if final.exists():  # re-saving the same step: move the old one aside first
            trash = out / f".trash-{final.name}-{time.time_ns()}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(out)
        if save_total_limit:
            rotate(out, save_total_limit)
    accelerator.wait_for_everyone()
    return final


def rotate(output_dir, keep: int) -> None:
    ck = list_checkpoints(output_dir)
    for _, p in ck[:-keep] if len(ck) > keep else []:
        trash = p.parent / f".trash-{p.name}-{time.time_ns()}"
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)


def load_state(ckpt: Path) -> dict:
    with open(Path(ckpt) / STATE_FILE) as f:
        return json.load(f)


def load_rng(ckpt: Path, process_index: int) -> dict | None:
    p = Path(ckpt) / f"rng_state_{process_index}.pth"
    if not p.is_file():
        p = Path(ckpt) / "rng_state_0.pth"
    return torch.load(p, weights_only=False) if p.is_file() else None
