"""Training arguments: one flat namespace shared by the YAML config and the command line.

    python train.py --config configs/tiny.yaml --max_steps 100 --learning_rate 1e-3

Every key of the YAML file and every `--key value` flag is a field below (flag names follow
transformers' run_clm.py where one exists); model keys are SpikeLMConfig's fields. Values on the
command line are read as YAML scalars (`--attention_window null`, `--block_types "[ssm, attention]"`);
a boolean flag without a value means true. An unknown key is an error that names it.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..data.loading import SAMPLE_BY


class ConfigError(ValueError):
    """A bad config file or flag, named precisely."""


def _h(text: str, default=None, group: str = "training"):
    return field(default=default, metadata={"help": text, "group": group})


# transformers.get_scheduler names that need nothing beyond warmup and total steps (the others need a
# metric at every step or extra kwargs train.py does not take)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt")

# SpikeLMConfig fields a config may set (vocab_size comes from the tokenizer; token ids too).
_MODEL_SKIP = {"self", "kwargs", "vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "use_cache"}


def model_keys() -> list[str]:
    from ..models import SpikeLMConfig
    return [p for p in inspect.signature(SpikeLMConfig.__init__).parameters if p not in _MODEL_SKIP]


@dataclass
class TrainArgs:
    config: str | None = _h("YAML file of defaults; flags override it", group="run")
    # ---- data
    dataset_name: str | None = _h("a `datasets` dataset (hub name or local dataset folder)", group="data")
    dataset_config_name: str | None = _h("its configuration name", group="data")
    train_file: Any = _h("local .txt/.jsonl/.parquet: file, glob, folder, or a list / comma-separated", group="data")
    validation_file: Any = _h("same forms as train_file", group="data")
    validation_split_percentage: float = _h("% of training documents held out when no validation data is given",
                                            5.0, "data")
    text_column: str = _h("column holding the text (.jsonl/.parquet/datasets)", "text", "data")
    sample_by: str = _h("how a .txt file splits into documents: document (the whole file), paragraph (at every "
                        "blank line: the model then restarts its state there) or line", "document", "data")
    document_start_pattern: str | None = _h("regex: a row matching it starts a new document and the rows after it "
                                            "join it (WikiText: '^ = [^=]'; a .txt file's rows are then its lines); "
                                            "default: every row is a document", None, "data")
    document_separator: str | None = _h("a literal string between documents inside a text (dropped), e.g. "
                                        "'<|endoftext|>' (in YAML, \"\\n\\n\\n\" for two blank lines)", None, "data")
    streaming: bool = _h("stream the data instead of loading it (needs max_steps)", False, "data")
    streaming_shuffle_buffer: int = _h("shuffle buffer of a streamed dataset (0: no shuffle)", 10000, "data")
    streaming_validation_documents: int = _h("documents held out from a stream when no validation data is given",
                                             200, "data")
    block_size: int = _h("tokens per training block", 512, "data")
    max_eval_samples: int | None = _h("evaluate on at most this many validation blocks (evenly spaced over them)", None,
                                        "data")
    preprocessing_num_workers: int | None = _h("processes for tokenising and packing", None, "data")
    cache_dir: str | None = _h("`datasets` cache folder (default: the HF cache)", None, "data")
    # ---- tokenizer
    tokenizer_name: str | None = _h("a local tokenizer folder; else a byte-level BPE is trained on the training data",
                                    None, "tokenizer")
    vocab_size: int | None = _h("size of the BPE to train (default 8192); with tokenizer_name or "
                                "model_name_or_path it must equal the vocabulary", None, "tokenizer")
    tokenizer_train_documents: int = _h("documents the BPE trains on (at most)", 100000, "tokenizer")
    # ---- model (plus every SpikeLMConfig field, added below)
    model_name_or_path: str | None = _h("start from this saved SpikeLM (folder); else a new model", None, "model")
    # ---- optimisation
    per_device_train_batch_size: int = _h("blocks per process per micro-step", 8)
    per_device_eval_batch_size: int | None = _h("blocks per process per eval step (default: train's)", None)
    gradient_accumulation_steps: int = _h("micro-steps per optimizer step", 1)
    learning_rate: float = _h("peak learning rate of AdamW", 3e-4)
    weight_decay: float = _h("AdamW weight decay (matrices only; not norms, biases)", 0.1)
    adam_beta1: float = _h("AdamW beta1", 0.9)
    adam_beta2: float = _h("AdamW beta2", 0.95)
    adam_epsilon: float = _h("AdamW epsilon", 1e-8)
    max_grad_norm: float = _h("clip the gradient norm to this (0: no clipping)", 1.0)
    lr_scheduler_type: str = _h("transformers.get_scheduler name: cosine, linear, constant_with_warmup, ...", "cosine")
    warmup_steps: int = _h("linear warmup steps", 0)
    max_steps: int = _h("optimizer steps; -1: num_train_epochs decides", -1)
    num_train_epochs: float = _h("epochs over the packed training blocks when max_steps is -1", 1.0)
    mixed_precision: str | None = _h("no, bf16 or fp16 (autocast; weights stay float32); unset: what `accelerate "
                                     "launch` (or its config) says, else no", None)
    gradient_checkpointing: bool = _h("recompute activations in backward", False)
    max_consecutive_nonfinite: int = _h("abort after this many steps in a row with a non-finite loss or gradient", 10)
    seed: int = _h("seed of the model init and the data order", 42)
    num_threads: int | None = _h("torch CPU threads per process (default: torch's; 1 is far faster for small "
                                 "models on a busy machine)", None)
    # ---- run, checkpoints, logs
    output_dir: str | None = _h("where checkpoints, logs and the final model go", None, "run")
    overwrite_output_dir: bool = _h("start afresh in an output_dir that holds a run (its checkpoints are removed)",
                                    False, "run")
    resume_from_checkpoint: str | None = _h("a checkpoint folder, or `latest` (newest in output_dir)", None, "run")
    save_steps: int = _h("save a checkpoint every this many steps (0: only at the end)", 500, "run")
    save_total_limit: int | None = _h("keep at most this many checkpoints (oldest removed)", None, "run")
    eval_steps: int | None = _h("evaluate every this many steps (0/None: only at the end)", 500, "run")
    logging_steps: int = _h("log every this many steps", 10, "run")
    report_to: str = _h("comma list of csv (output_dir/logs/*.csv) and accelerate trackers: tensorboard "
                        "(output_dir/logs/), wandb (offline with WANDB_MODE=offline), trackio, mlflow, comet_ml, aim, "
                        "clearml, dvclive, swanlab; or none, or all (csv + every installed tracker)", "csv", "run")
    disable_tqdm: bool = _h("no progress bar", False, "run")
    sample_prompt: str | None = _h("after training, print a sample continuing this prompt", None, "run")
    sample_max_new_tokens: int = _h("tokens of that sample (0: no sample)", 60, "run")
    model: dict = field(default_factory=dict, metadata={"help": "SpikeLMConfig fields (filled from the model keys)",
                                                         "group": "internal"})

    # the keys that define a run: a resume or a reuse of output_dir must agree on them
    NON_IDENTITY = ("config", "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "save_steps",
                    "save_total_limit", "eval_steps", "logging_steps", "report_to", "disable_tqdm", "sample_prompt",
                    "sample_max_new_tokens", "preprocessing_num_workers", "cache_dir", "max_eval_samples",
                    "per_device_eval_batch_size", "max_steps", "num_train_epochs", "num_threads")

    def identity(self) -> dict:
        d = self.to_dict()
        return {k: v for k, v in d.items() if k not in self.NON_IDENTITY}

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        d.update(self.model)
        return d


_FIELDS = {f.name: f for f in dataclasses.fields(TrainArgs) if f.name != "model"}


def all_keys() -> list[str]:
    return list(_FIELDS) + model_keys()


def _field_type(key: str) -> tuple[Any, bool]:
    """(base type, optional) of a TrainArgs field: `str | None` -> (str, True)."""
    tp = typing.get_type_hints(TrainArgs)[key]
    args = typing.get_args(tp)
    base = next((a for a in args if a is not type(None)), tp) if args else tp
    return base, type(None) in args


def _coerce(key: str, value, where: str):
    """Check/convert a value to the type of key (model keys are checked by SpikeLMConfig itself)."""
    if key not in _FIELDS:
        return value
    base, optional = _field_type(key)
    if value is None:
        if optional or base is Any:
            return None
        raise ConfigError(f"{where}: {key} cannot be null")
    if base is Any:
        return value
    if base in (int, float) and isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if base is str:
        if key == "mixed_precision" and value is False:  # YAML reads `no` as false
            return "no"
        if isinstance(value, (dict, list, bool)):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return str(value)
    return value


def _unknown(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `python train.py --help`"
    return ConfigError(f"{where}: unknown key {key!r}{hint}")


def load_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file: {path!r}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must be a mapping of key: value")
    return data


def parse_cli(argv: list[str]) -> dict:
    """`--key value`, `--key=value`, or a bare `--flag` (true). Values are YAML scalars."""
    out: dict = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"unexpected argument {tok!r}: options are --key value")
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            raw = val
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            raw = argv[i + 1]
            i += 2
        else:
            raw = "true"
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        f = _FIELDS.get(key)
        if f is not None and value is not None and not isinstance(value, list) and _field_type(key)[0] in (str, Any):
            value = raw  # strings (paths, prompts, "no") stay verbatim: YAML would read `no` as false
        out[key] = value
    return out


def help_text() -> str:
    lines = [__doc__.strip(), "", "usage: python train.py [--config FILE.yaml] [--key value ...]", ""]
    group = None
    for f in _FIELDS.values():
        g = f.metadata.get("group")
        if g != group:
            lines.append(f"{g}:")
            group = g
        lines.append(f"  --{f.name:34s} {f.metadata.get('help', '')} (default: {f.default!r})")
    lines.append("model (SpikeLMConfig fields; default: SpikeLMConfig's):")
    lines.append("  " + ", ".join(f"--{k}" for k in model_keys()))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    """YAML config (if --config) then flags; unknown keys and ill-typed values are errors naming the key."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        raise SystemExit(0)
    cli = parse_cli(argv)
    values: dict = {}
    mkeys = set(model_keys())
    if cli.get("config"):
        for k, v in load_yaml(cli["config"]).items():
            if k not in _FIELDS and k not in mkeys:
                raise _unknown(k, f"config {cli['config']!r}")
            values[k] = (k, v, f"config {cli['config']!r}")
    for k, v in cli.items():
        if k not in _FIELDS and k not in mkeys:
            raise _unknown(k, f"--{k}")
        values[k] = (k, v, f"--{k}")
    args = TrainArgs()
    for k, (_, v, where) in values.items():
        if k in mkeys:
            args.model[k] = v
        else:
            setattr(args, k, _coerce(k, v, where))
    validate(args)
    return args


REPORT_TO = ("csv", "tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab")


def report_to_list(value) -> list[str]:
    """--report_to as a list of backends: a comma list of REPORT_TO names, "none" or "all"."""
    names = [n.strip() for n in str(value).split(",") if n.strip()]
    if names in (["none"], ["all"]):
        return names
    bad = [n for n in names if n not in REPORT_TO]
    if not names or bad:
        raise ConfigError(f"--report_to: unknown backend {bad[0] if bad else value!r}; give a comma list of "
                          f"{', '.join(REPORT_TO)}, or none, or all")
    return list(dict.fromkeys(names))


def validate(a: TrainArgs) -> None:
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    need(a.output_dir, "--output_dir is required")
    need((a.train_file is None) != (a.dataset_name is None), "give exactly one of --train_file or --dataset_name")
    for k in ("block_size", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
              "max_consecutive_nonfinite"):
        need(getattr(a, k) >= 1, f"--{k} must be >= 1, got {getattr(a, k)}")
    for k in ("save_steps", "warmup_steps", "sample_max_new_tokens"):
        need(getattr(a, k) >= 0, f"--{k} must be >= 0, got {getattr(a, k)}")
    need(a.block_size >= 2, f"--block_size must be >= 2, got {a.block_size}")
    need(a.mixed_precision in (None, "no", "bf16", "fp16"), f"--mixed_precision must be no, bf16 or fp16, got "
                                                            f"{a.mixed_precision!r}")
    report_to_list(a.report_to)
    need(math.isfinite(a.learning_rate) and a.learning_rate > 0, f"--learning_rate must be > 0, got {a.learning_rate}")
    for k in ("weight_decay", "adam_epsilon", "max_grad_norm"):
        v = getattr(a, k)
        need(math.isfinite(v) and v >= 0, f"--{k} must be a finite number >= 0, got {v}")
    for k in ("adam_beta1", "adam_beta2"):
        need(0 <= getattr(a, k) < 1, f"--{k} must lie in [0, 1), got {getattr(a, k)}")
    need(a.lr_scheduler_type in LR_SCHEDULERS,
         f"--lr_scheduler_type must be one of {', '.join(LR_SCHEDULERS)}, got {a.lr_scheduler_type!r}")
    if a.lr_scheduler_type == "polynomial":  # decays to transformers' lr_end = 1e-7 over the steps after warmup
        need(a.learning_rate > 1e-7, f"--learning_rate must be > 1e-7 (the polynomial schedule's end), "
                                     f"got {a.learning_rate}")
        need(a.max_steps == -1 or a.warmup_steps != a.max_steps,
             f"--warmup_steps ({a.warmup_steps}) must differ from --max_steps for the polynomial schedule "
             "(it decays over the steps after warmup)")
    need(0 <= a.seed < 2**32, f"--seed must lie in [0, 2**32), got {a.seed}")
    for k in ("num_threads", "preprocessing_num_workers", "per_device_eval_batch_size", "max_eval_samples"):
        v = getattr(a, k)
        need(v is None or v >= 1, f"--{k} must be >= 1 (or null: the default), got {v}")
    need(a.num_threads is None or a.num_threads <= 4096, f"--num_threads must be <= 4096, got {a.num_threads}")
    need(a.eval_steps is None or a.eval_steps >= 0, f"--eval_steps must be >= 0 (or null), got {a.eval_steps}")
    need(a.streaming_shuffle_buffer >= 0, f"--streaming_shuffle_buffer must be >= 0, got {a.streaming_shuffle_buffer}")
    for k in ("streaming_validation_documents", "tokenizer_train_documents"):
        need(getattr(a, k) >= 1, f"--{k} must be >= 1, got {getattr(a, k)}")
    need(a.sample_by in SAMPLE_BY, f"--sample_by must be one of {', '.join(SAMPLE_BY)}, got {a.sample_by!r}")
    need(a.text_column != "", "--text_column must name a column, got an empty string")
    need(a.max_steps > 0 or a.max_steps == -1, f"--max_steps must be > 0 or -1, got {a.max_steps}")
    need(a.max_steps > 0 or (math.isfinite(a.num_train_epochs) and a.num_train_epochs > 0),
         f"--num_train_epochs must be a finite number > 0 when max_steps is -1, got {a.num_train_epochs}")
    need(not a.streaming or a.max_steps > 0, "--streaming needs --max_steps (a stream has no known length)")
    need(a.save_total_limit is None or a.save_total_limit >= 1,
         f"--save_total_limit must be >= 1, got {a.save_total_limit}")
    need(a.vocab_size is None or 258 <= a.vocab_size < 2**31, f"--vocab_size must lie in [258, 2**31), got {a.vocab_size}")
    if a.model:
        from ..models import SpikeLMConfig
        try:
            SpikeLMConfig(vocab_size=a.vocab_size or 8192, **a.model)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model settings: {e}") from None
    need(0 <= a.validation_split_percentage < 100,
         f"--validation_split_percentage must lie in [0, 100), got {a.validation_split_percentage}")
