"""The pretraining loop: accelerate, AdamW, warmup + cosine, clipping, autocast, atomic checkpoints, resume.

`train(args)` is what train.py runs; every problem with the inputs is raised (ConfigError,
DataError, TrainingError) before anything in output_dir is created or overwritten.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..data import (BlockOrder, DataError, evenly_spaced, iter_packed_blocks, iter_texts, load_raw_datasets, pack_dataset,
                    tokenize_dataset, train_bpe_tokenizer)
from ..eval import FiringRateMonitor
from ..models import SpikeLMConfig, SpikeLMForCausalLM
from . import checkpoint as ck
from .args import ConfigError, TrainArgs
from .logger import MetricLogger, check_report_to


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# ------------------------------------------------------------------------------------------------
# output_dir and resume
def resolve_run_dir(args: TrainArgs) -> Path | None:
    """Check output_dir against the request; return the checkpoint to resume from (or None). Writes nothing."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output_dir {str(out)!r} is a file, not a folder")
    identity = _jsonable(args.identity())
    entries = [p for p in out.iterdir() if not p.name.startswith((".tmp-checkpoint-", ".trash-"))] \
        if out.is_dir() else []
    run_file = out / ck.RUN_FILE
    resume = args.resume_from_checkpoint
    if resume in (None, "", False):
        if entries and not args.overwrite_output_dir:
            what = "a training run" if run_file.exists() or ck.list_checkpoints(out) else "files"
            raise ConfigError(f"--output_dir {str(out)!r} already holds {what} ({len(entries)} entries, e.g. "
                              f"{sorted(p.name for p in entries)[:3]}); pass --resume_from_checkpoint latest to "
                              "continue it, --overwrite_output_dir to replace it, or choose another --output_dir")
        return None
    if args.overwrite_output_dir:
        raise ConfigError("--resume_from_checkpoint and --overwrite_output_dir contradict each other: pick one")
    if run_file.exists():
        with open(run_file) as f:
            old = json.load(f).get("identity", {})
        diff = _diff(old, identity)
        if diff:
            raise ConfigError(f"--output_dir {str(out)!r} holds a different run (run_config.json differs: "
                              f"{'; '.join(diff)}); resume it with its own settings or choose another --output_dir")
    elif entries:
        raise ConfigError(f"--output_dir {str(out)!r} holds files but no {ck.RUN_FILE}: it is not a SpikeLM run; "
                          "choose another --output_dir")
    if resume == "latest":
        ckpt = ck.latest_checkpoint(out)
        if ckpt is None:
            return None  # nothing saved yet: start from scratch (e.g. killed before the first checkpoint)
    else:
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise ConfigError(f"--resume_from_checkpoint: no such folder: {resume!r}")
        if not ck.is_complete(ckpt):
            raise ConfigError(f"--resume_from_checkpoint {resume!r} is not a complete checkpoint "
                              f"(no {ck.STATE_FILE} or config.json)")
    state = ck.load_state(ckpt)
    diff = _diff(state.get("identity", {}), identity)
    if diff:
        raise ConfigError(f"checkpoint {str(ckpt)!r} belongs to a different run ({'; '.join(diff)})")
    return ckpt


# ------------------------------------------------------------------------------------------------
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
    if resume_ckpt is not None:
        model = SpikeLMForCausalLM.from_pretrained(resume_ckpt, dtype=torch.float32)
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
@torch.no_grad()
def evaluate(model, blocks, args: TrainArgs, accelerator) -> dict:
    """Token-weighted validation loss and perplexity over all validation blocks (sharded over processes)."""
    was_training = model.training
    model.eval()
    n = len(blocks)
    bsz = args.per_device_eval_batch_size or args.per_device_train_batch_size
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i in range(0, len(mine), bsz):
        rows = [blocks[j] for j in mine[i:i + bsz]]
        ids = torch.stack([torch.as_tensor(r["input_ids"]) for r in rows]).to(accelerator.device)
        pos = torch.stack([torch.as_tensor(r["position_ids"]) for r in rows]).to(accelerator.device)
        with accelerator.autocast():
            loss = model(input_ids=ids, labels=ids, position_ids=pos, use_cache=False).loss
        count = ids.shape[0] * (ids.shape[1] - 1)
        total += torch.tensor([float(loss) * count, count], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, reduction="sum") if accelerator.num_processes > 1 else total
    model.train(was_training)
    loss = float(total[0] / total[1])
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "blocks": n}


def _param_groups(model, weight_decay: float, learning_rate: float, neuron_learning_rate_scale: float = 1.0):
    """Weight decay on the weight matrices of linear and embedding layers only: never on norms, and
    never on a neuron's decay conv, which decay would pull towards one fixed decay for every input
    (the paper's worst ablation). The neurons' own parameters (a DSN's decay conv) learn at
    learning_rate x neuron_learning_rate_scale."""
    from ..neurons import DSN

    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    # (a separate group only when it learns at another rate: checkpoints of two-group runs still resume)
    neuron = {id(p) for m in model.modules() if isinstance(m, DSN) for p in m.parameters()} \
        if neuron_learning_rate_scale != 1.0 else set()
    groups = {"decay": [], "no_decay": [], "neuron": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        groups["decay" if id(p) in matrices else "neuron" if id(p) in neuron else "no_decay"].append(p)
    out = [{"params": groups["decay"], "weight_decay": weight_decay, "lr": learning_rate},
           {"params": groups["no_decay"], "weight_decay": 0.0, "lr": learning_rate}]
    if groups["neuron"]:
        out.append({"params": groups["neuron"], "weight_decay": 0.0, "lr": learning_rate * neuron_learning_rate_scale})
    return out


def _fault_nan_steps() -> set[int]:
    raw = os.environ.get("SPIKELM_FAULT_NAN_STEPS", "")  # tests: 1-based steps whose loss becomes NaN
    return {int(s) for s in raw.split(",") if s.strip()}


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------
def train(args: TrainArgs) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    t_start = time.perf_counter()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    check_report_to(args.report_to)
    resume_ckpt = resolve_run_dir(args)
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state()  # a second train() in one process may change mixed_precision
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    main = accelerator.is_main_process
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
    order = BlockOrder(train_blocks, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                       accelerator.num_processes, accelerator.process_index, seed=args.seed,
                       streaming=args.streaming)
    if not args.streaming and order.steps_per_epoch == 0:
        raise DataError(f"the training data packs into {order.num_blocks} blocks of {args.block_size} tokens, fewer "
                        f"than one global batch ({order.global_batch_size} = per_device_train_batch_size x "
                        f"gradient_accumulation_steps x processes): lower them or give more data")
    max_steps = args.max_steps if args.max_steps > 0 else max(1, math.ceil(args.num_train_epochs *
                                                                           order.steps_per_epoch))

    # ---- from here on output_dir is written
    out = Path(args.output_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ck.clean_partial(out)
        if args.overwrite_output_dir and resume_ckpt is None:
            for _, p in ck.list_checkpoints(out):
                shutil.rmtree(p)
            shutil.rmtree(out / "logs", ignore_errors=True)
        with open(out / (ck.RUN_FILE + ".tmp"), "w") as f:
            json.dump({"identity": _jsonable(args.identity()), "args": _jsonable(args.to_dict())}, f, indent=1)
        os.replace(out / (ck.RUN_FILE + ".tmp"), out / ck.RUN_FILE)
    accelerator.wait_for_everyone()

    if args.gradient_checkpointing:
        # transformers after 5.17 renamed it (the old name warns, and goes in v6)
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    optimizer = torch.optim.AdamW(_param_groups(model, args.weight_decay, args.learning_rate,
                                                args.neuron_learning_rate_scale), lr=args.learning_rate,
                                  betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=max_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)

    start_step, skipped, in_a_row, tokens_seen = 0, 0, 0, 0
    if resume_ckpt is not None:
        state = ck.load_state(resume_ckpt)
        optimizer.load_state_dict(torch.load(resume_ckpt / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(resume_ckpt / "scheduler.pt", weights_only=False))
        if accelerator.scaler is not None and (resume_ckpt / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(torch.load(resume_ckpt / "scaler.pt", weights_only=False))
        rng = ck.load_rng(resume_ckpt, accelerator.process_index)
        if rng is not None:
            ck.set_rng_state(rng)
        start_step = state["global_step"]
        skipped, in_a_row, tokens_seen = state["skipped_steps"], state["nonfinite_in_a_row"], state["tokens_seen"]
        accelerator.print(f"resuming from {resume_ckpt} at step {start_step}")

    logger = MetricLogger(out, args.report_to, start_step, enabled=main)
    n_params = sum(p.numel() for p in unwrapped.parameters())
    tokens_per_step = order.global_batch_size * args.block_size
    accelerator.print(f"SpikeLM {n_params / 1e6:.2f}M parameters | vocab {len(tokenizer)} | "
                      f"{'streamed' if args.streaming else f'{order.num_blocks} train blocks'} of {args.block_size} "
                      f"tokens | global batch {order.global_batch_size} blocks ({tokens_per_step} tokens) | "
                      f"{max_steps} steps | {accelerator.num_processes} process(es) on {accelerator.device}")

    def save(step: int, last_eval=None):
        state = {"global_step": step, "max_steps": max_steps, "data_position": order.position(step),
                 "skipped_steps": skipped, "nonfinite_in_a_row": in_a_row, "tokens_seen": tokens_seen,
                 "last_eval": last_eval, "identity": _jsonable(args.identity()),
                 "num_processes": accelerator.num_processes}
        return ck.save_checkpoint(accelerator, out, step, model, tokenizer, optimizer, scheduler, state,
                                  args.save_total_limit)

    nan_steps = _fault_nan_steps()
    step_sleep = float(os.environ.get("SPIKELM_FAULT_STEP_SLEEP", "0") or 0)  # tests: slow steps down to kill one
    bar = tqdm(total=max_steps, initial=start_step, disable=not main or args.disable_tqdm, dynamic_ncols=True,
               desc="train")
    model.train()
    window_loss = torch.zeros((), dtype=torch.float64)
    window_steps, window_tokens, t_window = 0, 0, time.perf_counter()
    last_eval, last_saved = None, start_step if resume_ckpt is not None else -1
    step = start_step
    batches = order.batches(start_step) if start_step < max_steps else iter(())
    for step0, micro in batches:
        step = step0 + 1  # steps are counted 1..max_steps; checkpoint-N holds the state after N steps
        log_now = step % args.logging_steps == 0 or step == max_steps
        monitor = FiringRateMonitor(unwrapped) if log_now else None
        step_loss = torch.zeros((), dtype=torch.float64)
        bad = False
        with monitor if monitor is not None else nullcontext():
            for m, batch in enumerate(micro):
                ids = batch["input_ids"].to(accelerator.device)
                pos = batch["position_ids"].to(accelerator.device)
                last = m == len(micro) - 1
                sync = nullcontext() if last or accelerator.num_processes == 1 else accelerator.no_sync(model)
                with sync:
                    with accelerator.autocast():
                        loss = model(input_ids=ids, labels=ids, position_ids=pos, use_cache=False).loss
                    if step in nan_steps:
                        loss = loss * float("nan")
                    finite = torch.isfinite(loss.detach()).float()
                    if accelerator.num_processes > 1:
                        finite = accelerator.reduce(finite, reduction="mean")
                    if float(finite) < 1.0:
                        bad = True
                        break
                    accelerator.backward(loss / len(micro))
                step_loss += float(loss.detach()) / len(micro)
        grad_norm = float("nan")
        if not bad:
            if args.max_grad_norm and args.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm))
            else:
                grad_norm = float(torch.norm(torch.stack([p.grad.detach().float().norm() for p in model.parameters()
                                                          if p.grad is not None])))
            if accelerator.scaler is None and not math.isfinite(grad_norm):
                bad = True
        if not bad:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # the schedule is a function of the step, skipped or not
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        if bad:
            skipped += 1
            in_a_row += 1
            accelerator.print(f"step {step}: non-finite loss or gradient, step skipped "
                              f"({in_a_row} in a row, {skipped} in all)")
            if in_a_row >= args.max_consecutive_nonfinite:
                bar.close()
                logger.close()
                raise TrainingError(f"{in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient; "
                                    f"aborting (--max_consecutive_nonfinite {args.max_consecutive_nonfinite}). Lower "
                                    "--learning_rate, raise --warmup_steps, or try --mixed_precision bf16/no; the "
                                    "last checkpoint is intact")
        else:
            in_a_row = 0
            window_loss += step_loss
            window_steps += 1
        bar.update(1)
        if step_sleep:
            time.sleep(step_sleep)

        if log_now:
            loss_t = (window_loss / max(window_steps, 1)).to(accelerator.device)
            if accelerator.num_processes > 1:
                loss_t = accelerator.reduce(loss_t.float(), reduction="mean")
            dt = time.perf_counter() - t_window
            metrics = {"loss": float(loss_t) if window_steps else float("nan"),
                       "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                       "tokens_per_s": window_tokens / dt if dt > 0 else 0.0,
                       "firing_rate": monitor.mean_rate() if monitor is not None else float("nan"),
                       "tokens": tokens_seen, "skipped_steps": skipped,
                       "epoch": step * order.global_batch_size / order.num_blocks if not args.streaming else -1.0}
            logger.log("train", step, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                            tok_s=f"{metrics['tokens_per_s']:.0f}", fire=f"{metrics['firing_rate']:.3f}")
            if args.disable_tqdm:
                accelerator.print(f"step {step}/{max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                                  f"tok/s {metrics['tokens_per_s']:.0f} firing {metrics['firing_rate']:.3f}")
            window_loss.zero_()
            window_steps, window_tokens, t_window = 0, 0, time.perf_counter()

        if eval_blocks is not None and args.eval_steps and step % args.eval_steps == 0 and step < max_steps:
            last_eval = evaluate(unwrapped, eval_blocks, args, accelerator)
            logger.log("eval", step, last_eval)
            bar.write(f"step {step}: eval loss {last_eval['loss']:.4f} ppl {last_eval['perplexity']:.2f}") \
                if main else None
        if args.save_steps and step % args.save_steps == 0 and step < max_steps:
            save(step, last_eval)
            last_saved = step
        if step >= max_steps:
            break
    bar.close()

    final_eval = None
    if eval_blocks is not None:
        final_eval = evaluate(unwrapped, eval_blocks, args, accelerator)
        logger.log("eval", step, final_eval)
        accelerator.print(f"final eval (step {step}): loss {final_eval['loss']:.4f} "
                          f"perplexity {final_eval['perplexity']:.2f}")
    if last_saved != step:
        save(step, final_eval)
    if main:
        unwrapped.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
    accelerator.wait_for_everyone()
    logger.close()
    sample = None
    if args.sample_prompt and main:
        sample = sample_text(unwrapped, tokenizer, args.sample_prompt, args.sample_max_new_tokens, args.seed)
        print(f"sample: {sample}")
    elapsed = time.perf_counter() - t_start
    summary = {"steps": step, "skipped_steps": skipped, "final_eval": final_eval, "seconds": elapsed,
               "parameters": n_params, "tokens_seen": tokens_seen, "sample": sample}
    if main:
        with open(out / "train_summary.json", "w") as f:
            json.dump(_jsonable(summary), f, indent=1)
    accelerator.print(f"done: {step} steps in {elapsed:.1f}s; model and tokenizer in {out}")
    return summary
