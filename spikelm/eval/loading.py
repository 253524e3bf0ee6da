"""Loading a saved SpikeLM model for the command-line tools, with errors that name the problem."""
from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class UserError(ValueError):
    """A problem with what the user asked for (a path, a flag): the CLIs print it without a traceback."""


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r} is not a device torch knows ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device!r}: CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype in (None, "", "auto"):
        return None
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {sorted(set(DTYPES))} or auto, got {dtype!r}")
    return DTYPES[dtype]


def load_model(path, device: str | None = "cpu", dtype: str | None = None, need_tokenizer: bool = True):
    """(model in eval mode, tokenizer or None) from a folder written by save_pretrained.

    Raises UserError when the folder is missing, is not a SpikeLM model, or lacks a tokenizer.
    """
    import spikelm  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars on the CLIs' stderr
    p = Path(path)
    if not p.exists():
        raise UserError(f"--model {path}: no such folder")
    if not p.is_dir():
        raise UserError(f"--model {path}: not a folder (give the folder written by save_pretrained)")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"--model {path}: not a model folder (no config.json in it)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"--model {path}: config.json is not valid JSON ({e})") from None
    if model_type != "spikelm":
        raise UserError(f"--model {path}: config.json says model_type={model_type!r}, not a SpikeLM model")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise UserError(f"--model {path}: no weights in it (no *.safetensors or *.bin file)")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    try:
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(p, **kwargs)
    except Exception as e:  # noqa: BLE001  (transformers raises many types for a broken folder)
        raise UserError(f"--model {path}: could not load the model ({type(e).__name__}: {e})") from None
    model = model.to(dev).eval()
    tokenizer = None
    if need_tokenizer:
        if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise UserError(f"--model {path}: no tokenizer in it (save the tokenizer with save_pretrained "
                            "into the same folder)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(p)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"--model {path}: could not load the tokenizer ({type(e).__name__}: {e})") from None
    return model, tokenizer


def training_length(path) -> int | None:
    """The block size the model was trained at, if the folder (or its parent) records it (run_config.json)."""
    p = Path(path)
    for folder in (p, p.parent):
        f = folder / "run_config.json"
        if f.is_file():
            try:
                data = json.loads(f.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if not isinstance(data, dict):
                continue
            # train.py writes {"identity": {...}, "args": {...}}; accept a flat file too
            for holder in [data, *(v for v in data.values() if isinstance(v, dict))]:
                if isinstance(holder.get("block_size"), int) and not isinstance(holder["block_size"], bool):
                    return holder["block_size"]
    return None


def read_text_file(path, what: str = "--text_file") -> str:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise UserError(f"{what} {path}: the file is empty")
    return text
