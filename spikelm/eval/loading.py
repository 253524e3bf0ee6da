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


def check_sparse_flags(sparse: str, int8: bool, device: torch.device) -> None:
    """The scripts' --sparse / --int8 pair: int8 quantises the sparse product's weights, which runs on CPU."""
    if int8 and sparse == "off":
        raise UserError("--int8 quantises the sparse product's weights: it needs --sparse auto or on, not off")
    if int8 and device.type != "cpu":
        raise UserError(f"--int8: the sparse product runs on CPU only, got device {device} (give --device cpu)")


def resolve_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype in (None, "", "auto"):
        return None
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {sorted(set(DTYPES))} or auto, got {dtype!r}")
    return DTYPES[dtype]


def _hub_file(name: str, filename: str, revision: str | None, required: bool = True) -> Path | None:
    """filename of the Hub model `name` as from_pretrained finds it: the local HF cache, else a download.

    Raises UserError naming what failed (not a Hub id, not on the Hub, offline and not cached, ...);
    a file that is not required and absent gives None.
    """
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    from transformers.utils import cached_file

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UserError(f"--model {name}: no such folder") from None
    try:
        found = cached_file(name, filename, revision=revision, _raise_exceptions_for_missing_entries=required,
                            _raise_exceptions_for_connection_errors=required)
    except OSError as e:
        at = f" at revision {revision!r}" if revision else ""
        if constants.HF_HUB_OFFLINE:
            raise UserError(f"--model {name}: no such folder, and no {filename} for the Hub model {name!r}{at} in "
                            f"the Hugging Face cache ({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE is set, so nothing is "
                            f"downloaded: download it first (`hf download {name}`) or unset HF_HUB_OFFLINE") from None
        raise UserError(f"--model {name}: no such folder, and the Hub model {name!r}{at} could not be loaded: "
                        f"{' '.join(str(e).split())}") from None
    return Path(found) if found else None


def _check_tokenizer(name, config, tokenizer) -> None:
    """The tokenizer must be the model's: no token id past the vocabulary, the same EOS."""
    n, vocab = len(tokenizer), config.vocab_size
    if n > vocab:
        raise UserError(f"--model {name}: the tokenizer has {n} tokens but the model's vocabulary is {vocab}: ids "
                        f">= {vocab} would be out of range; this is not the tokenizer the model was trained with "
                        "(save that one into the folder)")
    model_eos = config.eos_token_id
    model_eos = set(model_eos) if isinstance(model_eos, list) else ({model_eos} if model_eos is not None else set())
    tok_eos = tokenizer.eos_token_id
    if model_eos and tok_eos is None:
        raise UserError(f"--model {name}: the tokenizer has no EOS token but the model ends texts with token id "
                        f"{sorted(model_eos)[0]}: this is not the tokenizer the model was trained with")
    if model_eos and tok_eos not in model_eos:
        raise UserError(f"--model {name}: the tokenizer's EOS token is id {tok_eos} but the model's is "
                        f"{sorted(model_eos)[0] if len(model_eos) == 1 else sorted(model_eos)}: this is not the "
                        "tokenizer the model was trained with")


def load_model(path, device: str | None = "cpu", dtype: str | None = None, need_tokenizer: bool = True,
               revision: str | None = None):
    """(model in eval mode, tokenizer or None) from a folder written by save_pretrained or a Hub model id.

    Like from_pretrained: a path that exists is a local folder; anything else is a Hub id, found in
    the local Hugging Face cache or downloaded (HF_HUB_OFFLINE=1: the cache only; revision: a branch,
    tag or commit). Raises UserError when the folder or Hub model is missing, is not a SpikeLM
    model, lacks weights or a tokenizer, or its tokenizer does not match the model.
    """
    import spikelm  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars on the CLIs' stderr
    p = Path(path)
    local = p.exists()
    if local:
        if not p.is_dir():
            raise UserError(f"--model {path}: not a folder (give the folder written by save_pretrained)")
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise UserError(f"--model {path}: not a model folder (no config.json in it)")
    else:
        cfg_file = _hub_file(str(path), "config.json", revision)
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise UserError(f"--model {path}: config.json is not a JSON object ({e})") from None
    if model_type != "spikelm":
        raise UserError(f"--model {path}: config.json says model_type={model_type!r}, not a SpikeLM model")
    if local and not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise UserError(f"--model {path}: no weights in it (no *.safetensors or *.bin file)")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    source = p if local else str(path)
    hub_kwargs = {} if local else {"revision": revision}
    try:
        kwargs = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs, **hub_kwargs)
    except Exception as e:  # noqa: BLE001  (transformers raises many types for a broken folder)
        raise UserError(f"--model {path}: could not load the model ({type(e).__name__}: {' '.join(str(e).split())})") \
            from None
    model = model.to(dev).eval()
    tokenizer = None
    if need_tokenizer:
        if local and not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            raise UserError(f"--model {path}: no tokenizer in it (save the tokenizer with save_pretrained "
                            "into the same folder)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **hub_kwargs)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"--model {path}: could not load the tokenizer ({type(e).__name__}: "
                            f"{' '.join(str(e).split())})") from None
        _check_tokenizer(path, model.config, tokenizer)
    return model, tokenizer


def training_length(path, revision: str | None = None) -> int | None:
    """The block size the model was trained at, if the folder (or its parent; for a Hub model, the repo)
    records it (run_config.json)."""
    p = Path(path)
    if p.exists():
        candidates = [p / "run_config.json", p.parent / "run_config.json"]
    else:
        try:
            candidates = [_hub_file(str(path), "run_config.json", revision, required=False)]
        except UserError:
            candidates = []
    for f in candidates:
        if f is not None and f.is_file():
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
    """The UTF-8 text of a prompt or evaluation file; UserError if it is missing, unreadable, binary or empty."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {path}: is a folder, not a file")
    if not p.is_file():
        raise UserError(f"{what} {path}: no such file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    if b"\0" in data:
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        raise UserError(f"{what} {path}: not a text file (a NUL byte on line {line}: binary data, or text in "
                        "UTF-16/UTF-32; convert it to UTF-8)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{what} {path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}: "
                        f"{e.reason}); re-encode it as UTF-8, e.g. `iconv -f LATIN1 -t UTF-8`") from None
    if not text.strip():
        raise UserError(f"{what} {path}: the file is empty")
    return text
