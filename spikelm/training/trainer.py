"""train.py's run: tokenizer, data and SpikeLM built from TrainArgs, then the loop of spikelm.training.loop.

`train(args)` is what train.py runs; every problem with the inputs is raised (ConfigError,
DataError, CheckpointError, TrainingError) before anything in output_dir is created or overwritten.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..data import (DataError, evenly_spaced, iter_packed_blocks, iter_texts, load_raw_datasets, pack_dataset, tokenize_dataset,
                    train_bpe_tokenizer)
from ..models import SpikeLMConfig, SpikeLMForCausalLM
from .args import ConfigError, TrainArgs
from .checkpoint import file_sha256
from .hooks import TrainingHooks
from .logger import check_report_to
from .loop import (TrainingError, TrainingInterrupted, command_line, evaluate, make_accelerator, resolve_run_dir,
                   sample_text, train_model)

__all__ = ["TrainingError", "TrainingInterrupted", "build_data", "build_model", "build_tokenizer", "evaluate",
           "pack_splits", "resolve_run_dir", "sample_text", "train", "train_model"]


def _tokenizer_fingerprint(tok) -> str:
    return hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def build_tokenizer(args: TrainArgs, train_raw, resume_ckpt):
    from transformers import AutoTokenizer
    if resume_ckpt is not None:
        return AutoTokenizer.from_pretrained(resume_ckpt)
    if args.tokenizer_name or args.model_name_or_path:
        name = args.tokenizer_name or args.model_name_or_path
        try:
            tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"--tokenizer_name {name!r}: cannot load a tokenizer from it: {e}") from e
        if tok.eos_token_id is None:
            raise ConfigError(f"--tokenizer_name {name!r}: the tokenizer has no EOS token (needed between documents)")
        return tok
    texts = iter_texts(train_raw, args.text_column, limit=args.tokenizer_train_documents)
    return train_bpe_tokenizer(texts, args.vocab_size or 8192)


def build_model(args: TrainArgs, tokenizer, resume_ckpt):
    if resume_ckpt is not None:  # the architecture; train_model loads the checkpoint's weights into it
        model = SpikeLMForCausalLM(SpikeLMConfig.from_pretrained(resume_ckpt))
    elif args.model_name_or_path:
        model = SpikeLMForCausalLM.from_pretrained(args.model_name_or_path, dtype=torch.float32)
    else:
        try:
            config = SpikeLMConfig(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                                   bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                                   **args.model)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model settings: {e}") from e
        model = SpikeLMForCausalLM(config)
    n_tok = len(tokenizer)
    if model.config.vocab_size != n_tok:
        raise ConfigError(f"the tokenizer's vocabulary ({n_tok} tokens) does not match the model's vocab_size "
                          f"({model.config.vocab_size}); use the tokenizer the model was trained with")
    if args.vocab_size is not None and args.vocab_size != n_tok and (args.tokenizer_name or args.model_name_or_path):
        raise ConfigError(f"--vocab_size {args.vocab_size} does not match the tokenizer's vocabulary ({n_tok} tokens)")
    if args.model_name_or_path and args.model:
        raise ConfigError(f"model keys {sorted(args.model)} cannot change a model loaded from --model_name_or_path")
    return model


def build_data(args: TrainArgs, accelerator) -> dict:
    """The raw text splits {"train", "validation"} (validation may be None)."""
    with accelerator.main_process_first():
        raw = load_raw_datasets(train_file=args.train_file, validation_file=args.validation_file,
                                dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
                                text_column=args.text_column, sample_by=args.sample_by,
                                validation_split_percentage=args.validation_split_percentage, streaming=args.streaming,
                                streaming_validation_documents=args.streaming_validation_documents,
                                seed=args.seed, cache_dir=args.cache_dir,
                                document_start_pattern=args.document_start_pattern,
                                document_separator=args.document_separator)
    return raw


def pack_splits(args: TrainArgs, raw: dict, tokenizer, accelerator):
    """(train blocks, eval blocks or None): map-style datasets, or for streaming a callable epoch -> iterator of
    training blocks and a list of validation blocks."""
    eos = tokenizer.eos_token_id
    bs = args.block_size
    if not args.streaming:
        with accelerator.main_process_first():
            tok = {k: tokenize_dataset(v, tokenizer, args.text_column, args.preprocessing_num_workers)
                   for k, v in raw.items() if v is not None}
            packed = {k: pack_dataset(v, eos, bs, args.preprocessing_num_workers) for k, v in tok.items()}
        for split, ds in packed.items():
            if len(ds) == 0:
                n = sum(len(x) + 1 for x in tok[split]["input_ids"])
                raise DataError(f"--block_size {bs} is larger than the {split} data ({n} tokens with EOS "
                                f"separators): lower --block_size or give more data")
        train, valid = packed["train"], packed.get("validation")
        if args.max_eval_samples and valid is not None and len(valid) > args.max_eval_samples:
            # spread over the whole split: validation files are often ordered by source or topic
            valid = valid.select(evenly_spaced(len(valid), args.max_eval_samples))
        return train, valid

    def stream_of(ds, shuffle: bool):
        def make(epoch: int):
            d = ds
            if shuffle and args.streaming_shuffle_buffer:
                d = d.shuffle(seed=args.seed, buffer_size=args.streaming_shuffle_buffer)
                d.set_epoch(epoch)
            return iter_packed_blocks(tokenize_dataset(d, tokenizer, args.text_column, streaming=True), eos, bs)
        return make

    train = stream_of(raw["train"], True)
    valid = None
    if raw.get("validation") is not None:
        blocks = list(iter_packed_blocks(tokenize_dataset(raw["validation"], tokenizer, args.text_column,
                                                          streaming=True), eos, bs))
        if args.max_eval_samples:
            blocks = [blocks[i] for i in evenly_spaced(len(blocks), args.max_eval_samples)]
        if not blocks:
            raise DataError(f"--block_size {bs} is larger than the validation data")
        valid = blocks
    first = next(iter(train(0)), None)
    if first is None:
        raise DataError(f"--block_size {bs} is larger than the streamed training data")
    return train, valid




# ------------------------------------------------------------------------------------------------
# the data's license where it is known: files shipped with SpikeLM, recognised by name and content
_MILTON = "public domain (John Milton, Paradise Lost; Project Gutenberg transcription, see SpikeLM's data/README.md)"
_SHIPPED_DATA = {"paradise_lost_train.txt": ("37d998f36fc8876b", _MILTON),
                 "paradise_lost_heldout.txt": ("c1c12fd6b900601b", _MILTON)}


def _data_facts(args: TrainArgs) -> dict:
    from ..data import resolve_data_files

    if args.dataset_name:
        name = args.dataset_name + (f" ({args.dataset_config_name})" if args.dataset_config_name else "")
        return {"data": [name], "data_license": None}
    files = []
    for spec in (args.train_file, args.validation_file):
        if spec is not None:
            files += [str(f) for f in resolve_data_files(spec)]
    licenses = set()
    for f in files:
        known = _SHIPPED_DATA.get(Path(f).name)
        if known is None or not file_sha256(Path(f)).startswith(known[0]):
            licenses = None
            break
        licenses.add(known[1])
    return {"data": [Path(f).name for f in files] if len(files) > 3 else files,
            "data_license": "; ".join(sorted(licenses)) if licenses else None}


def train(args: TrainArgs, hooks: TrainingHooks | None = None) -> dict:
    """Build the tokenizer, data and model that args describe and train them (train_model)."""
    from accelerate.utils import set_seed

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    check_report_to(args.report_to)
    args, accelerator = make_accelerator(args)
    resume_ckpt = resolve_run_dir(args, accelerator.print)
    set_seed(args.seed)

    # ---- data, tokenizer, model: every check happens here, before output_dir is touched
    raw = build_data(args, accelerator)
    tokenizer = build_tokenizer(args, raw["train"], resume_ckpt)
    if accelerator.num_processes > 1:
        fps = accelerator.gather_for_metrics([_tokenizer_fingerprint(tokenizer)], use_gather_object=True)
        if len(set(fps)) != 1:
            raise TrainingError("the processes built different tokenizers; give --tokenizer_name")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token (needed between documents)")
    model = build_model(args, tokenizer, resume_ckpt)
    train_blocks, eval_blocks = pack_splits(args, raw, tokenizer, accelerator)
    info = dict(_data_facts(args), command=command_line())
    return train_model(model, train_blocks, eval_blocks, args, tokenizer=tokenizer, hooks=hooks,
                       accelerator=accelerator, resume_from=resume_ckpt, run_info=info)
