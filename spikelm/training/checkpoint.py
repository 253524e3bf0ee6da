"""Checkpoints: atomic, pickle-free and checksummed.

checkpoint-N/ holds the model (model.safetensors, config.json, README.md), the tokenizer, optimizer.pt,
scheduler.pt, scaler.pt (fp16 only) and rng_state_<rank>.pth, all plain tensors and numbers that
`torch.load(weights_only=True)` reads (it refuses anything that would run code), and
trainer_state.json, written last: the training state, the size and sha256 of every other file, and
a digest of its own content. A resume verifies all of it first and refuses a checkpoint whose files
are missing, truncated or changed (CheckpointError), naming the file.

Everything is written into a hidden .tmp-checkpoint-N, fsynced, and renamed once, so a kill at any
moment leaves either the old set of checkpoints or the old set plus the new one; a half-written
folder is only ever .tmp-checkpoint-* (ignored, removed on the next start), and an old checkpoint
is renamed to .trash-* before it is deleted. A write that fails (disk full, read-only folder) raises
CheckpointWriteError and leaves the earlier checkpoints as they were.
"""
from __future__ import annotations

import hashlib
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
FORMAT_VERSION = 2  # 1: pickled optimizer/RNG files, no checksums (refused)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: a file is missing, truncated or changed, or it is not a checkpoint."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only output_dir, ...); earlier ones are intact."""


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
    """Structurally complete (its last-written file is there); verify() checks the contents."""
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


# ------------------------------------------------------------------------------------------------
# RNG streams as tensors and numbers (no pickled objects)
def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"python_version": version, "python_mt": torch.tensor(mt, dtype=torch.int64), "python_gauss": gauss,
          "numpy_keys": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
          "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate((st["python_version"], tuple(st["python_mt"].tolist()), st["python_gauss"]))
    np.random.set_state(("MT19937", st["numpy_keys"].numpy().astype(np.uint32), st["numpy_pos"],
                         st["numpy_has_gauss"], st["numpy_gauss"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def load_tensors(path: Path):
    """A .pt/.pth file of this format: tensors, numbers, strings, lists and dicts only."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"{path} cannot be read as plain tensors (weights_only=True): {e}") from e


def load_rng(ckpt: Path, process_index: int) -> dict | None:
    p = Path(ckpt) / f"rng_state_{process_index}.pth"
    if not p.is_file():
        p = Path(ckpt) / "rng_state_0.pth"
    return load_tensors(p) if p.is_file() else None


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """The checkpoint's model.safetensors into `model` (same architecture); tied weights saved once."""
    from safetensors.torch import load_file

    sd = load_file(str(Path(folder) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in sd if k in params}
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if untied or unexpected:
        raise CheckpointError(f"{folder}/model.safetensors does not fit the model: missing {untied[:5]}, "
                              f"unexpected {unexpected[:5]}")


# ------------------------------------------------------------------------------------------------
# integrity
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _state_digest(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != "state_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _write_state_file(folder: Path, state: dict) -> None:
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE}
    doc = dict(state, format_version=FORMAT_VERSION, files=files)
    doc["state_sha256"] = _state_digest(doc)
    with open(folder / STATE_FILE, "w") as f:
        json.dump(doc, f, indent=1)


def verify(ckpt) -> dict:
    """The training state of checkpoint `ckpt` once every file checks out; CheckpointError names the
    first problem."""
    ckpt = Path(ckpt)
    sf = ckpt / STATE_FILE
    if not sf.is_file():
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {STATE_FILE})")
    try:
        doc = json.loads(sf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{sf} is truncated or not JSON ({e})") from None
    if not isinstance(doc, dict) or "files" not in doc or "state_sha256" not in doc:
        raise CheckpointError(f"{ckpt} has no checksums (written by an older SpikeLM, whose checkpoints held "
                              "pickles): it cannot be resumed safely")
    if _state_digest(doc) != doc["state_sha256"]:
        raise CheckpointError(f"{sf} was changed after it was written (its digest does not match)")
    for name, meta in doc["files"].items():
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"{ckpt}: {name} is missing")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{ckpt}: {name} is truncated or changed ({size} bytes, {meta['bytes']} written)")
        if file_sha256(p) != meta["sha256"]:
            raise CheckpointError(f"{ckpt}: {name} was changed after it was written (sha256 differs)")
    return read_state(ckpt)


def newest_intact(output_dir, before: int | None = None) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint in output_dir that verifies, [(newer refused checkpoint, why)]), looking only
    at steps < before when given."""
    refused = []
    for step, path in reversed(list_checkpoints(output_dir)):
        if before is not None and step >= before:
            continue
        try:
            verify(path)
        except CheckpointError as e:
            refused.append((path, str(e)))
            continue
        return path, refused
    return None, refused


def read_state(ckpt) -> dict:
    """The training state of a checkpoint that verify() has passed (no hashing again)."""
    doc = json.loads((Path(ckpt) / STATE_FILE).read_text())
    return {k: v for k, v in doc.items() if k not in ("files", "state_sha256", "format_version")}


# ------------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, output_dir, step: int, *, model, model_state: dict | None, tokenizer,
                    optimizer_state: dict | None, scheduler_state: dict, scaler_state: dict | None, state: dict,
                    model_card: str | None = None, save_total_limit: int | None = None, hooks=None) -> Path:
    """Write output_dir/checkpoint-STEP atomically (every process calls this).

    model: the unwrapped model (its save_pretrained writes config and weights); model_state and
    optimizer_state: full state dicts on the main process (None elsewhere).
    """
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}"
    main = accelerator.is_main_process
    error = None
    try:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except Exception as e:  # noqa: BLE001
        error = e
    _agree(accelerator, error, tmp)
    try:
        if main:
            model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
            if model_card is not None:
                (tmp / "README.md").write_text(model_card)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            torch.save(optimizer_state, tmp / "optimizer.pt")
            torch.save(scheduler_state, tmp / "scheduler.pt")
            if scaler_state is not None:
                torch.save(scaler_state, tmp / "scaler.pt")
        torch.save(rng_state(), tmp / f"rng_state_{accelerator.process_index}.pth")
    except Exception as e:  # noqa: BLE001
        error = e
    _agree(accelerator, error, tmp)
    try:
        if main:
            if hooks is not None:
                hooks.on_checkpoint_files_written(tmp, step)
            _write_state_file(tmp, state)  # written last: marks the folder complete
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
            if hooks is not None:
                hooks.on_checkpoint_saved(final, step)
    except Exception as e:  # noqa: BLE001
        error = e
    _agree(accelerator, error, tmp)
    return final


def _agree(accelerator, error: BaseException | None, tmp: Path) -> None:
    """Every process learns whether any failed; all raise CheckpointWriteError together (no process is
    left waiting in a collective), after the main process removed the half-written folder."""
    failed = error is not None
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(failed)], device=accelerator.device)
        failed = float(accelerator.reduce(flag, reduction="sum")) > 0
    if not failed:
        return
    out = tmp.parent
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    where = f" in {out}"
    try:
        free = f"; {shutil.disk_usage(out).free / 2**20:.1f} MiB free there"
    except OSError:
        free = ""
    kept = latest_checkpoint(out)
    prev = f"the previous checkpoint {kept} is intact" if kept else "no earlier checkpoint exists"
    what = f"{type(error).__name__}: {error}" if error is not None else "another process failed to write its part"
    raise CheckpointWriteError(f"could not write a checkpoint{where} ({what}{free}); {prev}. Free some space or "
                               "make output_dir writable, then resume with --resume_from_checkpoint latest") \
        from error


def rotate(output_dir, keep: int) -> None:
    ck = list_checkpoints(output_dir)
    for _, p in ck[:-keep] if len(ck) > keep else []:
        trash = p.parent / f".trash-{p.name}-{time.time_ns()}"
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
