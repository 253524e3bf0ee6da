"""The training recipe and loop, for train.py and the benchmarks alike.

    summary = train_model(model, train_blocks, eval_blocks, args, tokenizer=tokenizer)

trains any causal LM (a SpikeLM, a transformers Llama, ...) on packed blocks (rows with input_ids
and position_ids of one length, e.g. spikelm.data.pack_dataset's output) with the recipe of
train.py: AdamW with weight decay on linear and embedding matrices only, a warmup + decay
schedule from transformers.get_scheduler, gradient clipping, autocast, the step order of
spikelm.data.BlockOrder, non-finite steps skipped, checkpoints, resume, SIGTERM/SIGINT handling,
DDP or FSDP under `accelerate launch`, and metric logs. `train()` (spikelm.training.trainer) builds
the tokenizer, data and SpikeLM from TrainArgs and calls this.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..data import BlockOrder, DataError
from ..eval import FiringRateMonitor
from ..layers import sparse_mode_as
from . import checkpoint as ck
from . import distributed as dist_
from .args import ConfigError, TrainArgs
from .hooks import TrainingHooks
from .logger import MetricLogger, resolve_report_to
from .state import TrainingState


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite steps in a row)."""


class TrainingInterrupted(TrainingError):
    """SIGTERM or SIGINT stopped the run after a step; `checkpoint` holds everything up to `step`."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: Path):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _diff(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# ------------------------------------------------------------------------------------------------
# accelerate, output_dir and resume
def make_accelerator(args: TrainArgs):
    """(args with mixed_precision as it is in force, the Accelerator). An unset --mixed_precision takes
    what `accelerate launch` (or its config) says, else no."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if dist_.cpu_fsdp1_requested():
        raise ConfigError("FSDP on CPU runs as FSDP2: add --fsdp_version 2 to `accelerate launch --use_fsdp` "
                          "(accelerate's FSDP1 plugin needs a GPU for sync_module_states)")
    AcceleratorState._reset_state()  # a second run in one process may change mixed_precision
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    return dataclasses.replace(args, mixed_precision=accelerator.mixed_precision), accelerator


def _checkpoint_for_latest(out: Path, log=print) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are named and passed over."""
    ckpt, refused = ck.newest_intact(out)
    for path, why in refused:
        log(f"warning: not resuming from {path}: {why}")
    if refused and ckpt is not None:
        log(f"resuming from the newest intact checkpoint instead: {ckpt}")
    if ckpt is None and refused:
        raise ck.CheckpointError(f"no checkpoint in {str(out)!r} is intact ({refused[0][1]}); start afresh with "
                                 "--overwrite_output_dir or choose another --output_dir")
    return ckpt


def resolve_run_dir(args: TrainArgs, log=print) -> Path | None:
    """Check output_dir against the request; return the verified checkpoint to resume from (or None).
    Writes nothing."""
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
        ckpt = _checkpoint_for_latest(out, log)
        if ckpt is None:
            return None  # nothing saved yet: start from scratch (e.g. killed before the first checkpoint)
    else:
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise ConfigError(f"--resume_from_checkpoint: no such folder: {resume!r}")
        try:
            ck.verify(ckpt)
        except ck.CheckpointError as e:
            m = ck.CKPT_RE.match(ckpt.name)
            good, _ = ck.newest_intact(ckpt.parent, before=int(m.group(1)) if m else None)
            offer = (f"; the newest intact checkpoint before it is {good}: resume with --resume_from_checkpoint "
                     f"{good} (or latest)") if good is not None else "; no earlier intact checkpoint is there"
            raise ck.CheckpointError(f"--resume_from_checkpoint {resume!r} is refused: {e}{offer}") from None
    state = ck.verify(ckpt)
    diff = _diff(state.get("identity", {}), identity)
    if diff:
        raise ConfigError(f"checkpoint {str(ckpt)!r} belongs to a different run ({'; '.join(diff)})")
    return ckpt


# ------------------------------------------------------------------------------------------------
# the recipe
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices of linear and embedding layers only: never on norms, and
    never on a neuron's decay conv, which decay would pull towards one fixed decay for every input
    (the paper's worst ablation)."""
    matrices = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if id(p) in matrices else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(groups: list[dict], device: torch.device | str | None = None, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW over param groups, fused where every parameter is a float tensor on a CPU or CUDA device
    (device: where the parameters will be when the optimizer steps, if they are to be moved after this call;
    default: where they are now): the fused kernel updates every tensor in one call, and a small model has ~70
    of them (each DSN's conv); the default per-tensor loop cost 3.7 ms a step against 1.0 ms fused on the tiny
    config (1 CPU thread)."""
    def device_type(p):
        return torch.device(device).type if device is not None else p.device.type
    fused = all(device_type(p) in ("cpu", "cuda") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def build_optimizer(model: torch.nn.Module, args: TrainArgs, max_steps: int, device=None):
    """(AdamW over param_groups, the --lr_scheduler_type schedule with --warmup_steps over max_steps); device: where
    the model will train (accelerate moves it there after this call)."""
    from transformers import get_scheduler

    optimizer = adamw(param_groups(model, args.weight_decay), device, lr=args.learning_rate,
                      betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    scheduler = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps,
                              num_training_steps=max_steps)
    return optimizer, scheduler


def _forward_loss(model, batch: dict, device):
    ids = batch["input_ids"].to(device)
    pos = batch["position_ids"].to(device)
    return model(input_ids=ids, labels=ids, position_ids=pos, use_cache=False)


@torch.no_grad()
def evaluate(model, blocks, args: TrainArgs, accelerator) -> dict:
    """Token-weighted validation loss and perplexity over all validation blocks (sharded over processes),
    and the mean firing rate of the model's neuron layers (NaN for a model without any)."""
    was_training = model.training
    model.eval()
    n = len(blocks)
    bsz = args.per_device_eval_batch_size or args.per_device_train_batch_size
    mine = list(range(accelerator.process_index, n, accelerator.num_processes))
    # under FSDP every forward is collective: every process runs the same number of batches (a process
    # out of blocks reruns block 0 and counts nothing)
    n_batches = math.ceil(math.ceil(n / accelerator.num_processes) / bsz)
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    monitor = FiringRateMonitor(accelerator.unwrap_model(model))
    with monitor:
        for b in range(n_batches):
            idx = mine[b * bsz:(b + 1) * bsz]
            rows = [blocks[j] for j in idx] or [blocks[0]]
            batch = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in ("input_ids", "position_ids")}
            with accelerator.autocast():
                loss = _forward_loss(model, batch, accelerator.device).loss
            count = len(idx) * (batch["input_ids"].shape[1] - 1)
            total += torch.tensor([float(loss) * count, count], dtype=torch.float64, device=accelerator.device)
    rate = torch.tensor([monitor.mean_rate() if monitor.totals else float("nan")], dtype=torch.float64,
                        device=accelerator.device)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
        rate = accelerator.reduce(rate, reduction="mean")
    model.train(was_training)
    loss = float(total[0] / total[1])
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "blocks": n, "firing_rate": float(rate)}


class _StopSignals:
    """SIGTERM and SIGINT ask the loop to stop after the current step (a second one aborts at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, log):
        self.received: int | None = None
        self._old = {}
        self._log = log

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: aborting without a checkpoint")
        self.received = signum
        self._log(f"{signal.Signals(signum).name} received: finishing this step, then saving a checkpoint "
                  "(send it again to abort without one)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


# ------------------------------------------------------------------------------------------------
_RESOLVE = object()


def train_model(model, train_blocks, eval_blocks, args: TrainArgs, *, tokenizer=None,
                hooks: TrainingHooks | None = None, accelerator=None, resume_from=_RESOLVE,
                run_info: dict | None = None) -> dict:
    """Train `model` in place on `train_blocks` with the recipe and loop of train.py; return the summary.

    train_blocks: a map-style dataset (or list) of rows {"input_ids", "position_ids"} of one length,
    or, with args.streaming, a callable epoch -> iterator of such rows. eval_blocks: a list/dataset of
    rows, or None. args: the TrainArgs of the run (output_dir, optimisation, checkpoints, logging).
    tokenizer: saved with every checkpoint and the final model when given. hooks: see
    spikelm.training.hooks. accelerator: an existing Accelerator (default: one made from args).
    resume_from: a checkpoint folder that resolve_run_dir(args) returned (it verifies the files), or
    None; by default args.resume_from_checkpoint is resolved here. run_info: facts for the model card
    (data, data_license, command).
    """
    run = _Run(model, train_blocks, eval_blocks, args, tokenizer, hooks or TrainingHooks(), accelerator,
               resume_from, run_info or {})
    return run.execute()


class _Run:
    """One call of train_model: setup, the loop's named steps, and the end of the run."""

    def __init__(self, model, train_blocks, eval_blocks, args, tokenizer, hooks, accelerator, resume_from, info):
        if accelerator is None:
            args, accelerator = make_accelerator(args)
        else:
            args = dataclasses.replace(args, mixed_precision=accelerator.mixed_precision)
        self.args, self.acc, self.hooks, self.tokenizer, self.info = args, accelerator, hooks, tokenizer, info
        self.main = accelerator.is_main_process
        self.log = accelerator.print
        resolve_report_to(args.report_to)
        self.resume = resolve_run_dir(args, self.log) if resume_from is _RESOLVE else resume_from
        self.train_blocks, self.eval_blocks = train_blocks, eval_blocks
        if not args.streaming and len(train_blocks) == 0:
            raise DataError("there are no training blocks")
        first = next(iter(train_blocks(0))) if args.streaming else train_blocks[0]
        self.block_size = len(first["input_ids"])
        self.order = BlockOrder(train_blocks, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                                accelerator.num_processes, accelerator.process_index, seed=args.seed,
                                streaming=args.streaming)
        if not args.streaming and self.order.steps_per_epoch == 0:
            raise DataError(f"the training data packs into {self.order.num_blocks} blocks of {self.block_size} "
                            f"tokens, fewer than one global batch ({self.order.global_batch_size} = "
                            "per_device_train_batch_size x gradient_accumulation_steps x processes): lower them or "
                            "give more data")
        self.max_steps = args.max_steps if args.max_steps > 0 else max(
            1, math.ceil(args.num_train_epochs * self.order.steps_per_epoch))
        self.tokens_per_step = self.order.global_batch_size * self.block_size
        self.model = model
        self.out = Path(args.output_dir)
        self.train_firing_rate = None  # the newest logged one, for model cards

    # ---- setup ---------------------------------------------------------------------------------
    def prepare_output_dir(self) -> None:
        """From here on output_dir is written (every check on the inputs is done)."""
        args, out = self.args, self.out
        if self.main:
            out.mkdir(parents=True, exist_ok=True)
            ck.clean_partial(out)
            if args.overwrite_output_dir and self.resume is None:
                for _, p in ck.list_checkpoints(out):
                    shutil.rmtree(p)
                shutil.rmtree(out / "logs", ignore_errors=True)
            tmp = out / (ck.RUN_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"identity": _jsonable(args.identity()), "args": _jsonable(args.to_dict())}, f, indent=1)
            os.replace(tmp, out / ck.RUN_FILE)
        self.acc.wait_for_everyone()

    def prepare_model(self) -> None:
        args, acc = self.args, self.acc
        model = self.model
        if self.resume is not None:
            ck.load_weights(model, self.resume)
        if args.gradient_checkpointing:
            # transformers after 5.17 renamed it (the old name warns, and goes in v6)
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        self.cpu_fsdp = dist_.fsdp_requested(acc) and acc.distributed_type.name == "MULTI_CPU"
        if self.cpu_fsdp:
            model = dist_.shard_on_cpu(model, acc)
        self.optimizer, self.scheduler = build_optimizer(model, args, self.max_steps, acc.device)
        if self.cpu_fsdp:  # accelerate would wrap the sharded model in DDP: prepare the optimizer only
            self.optimizer = acc.prepare(self.optimizer)
        else:
            model, self.optimizer = acc.prepare(model, self.optimizer)
        self.model = model
        self.unwrapped = acc.unwrap_model(model)
        self.sharded = self.cpu_fsdp or dist_.fsdp_requested(acc)
        self.n_params = sum(p.numel() for p in self.unwrapped.parameters())

    def restore(self) -> TrainingState:
        state = TrainingState(max_steps=self.max_steps, identity=_jsonable(self.args.identity()),
                              num_processes=self.acc.num_processes)
        if self.resume is None:
            return state
        ckpt = self.resume
        saved = ck.read_state(ckpt)
        keys = "name" if self.sharded else "index"  # FSDP's full optimizer state is keyed by parameter name
        if saved.get("optimizer_keys", "index") != keys:
            how = "a sharded (FSDP)" if keys == "index" else "an unsharded (single-process or DDP)"
            raise ConfigError(f"checkpoint {str(ckpt)!r} was written by {how} run; resume it the same way")
        optim = ck.load_tensors(ckpt / "optimizer.pt") if self.main or not self.sharded else None
        dist_.load_optimizer_state(self.model, self.optimizer, optim, self.sharded)
        self.scheduler.load_state_dict(ck.load_tensors(ckpt / "scheduler.pt"))
        if self.acc.scaler is not None and (ckpt / "scaler.pt").is_file():
            self.acc.scaler.load_state_dict(ck.load_tensors(ckpt / "scaler.pt"))
        rng = ck.load_rng(ckpt, self.acc.process_index)
        if rng is not None:
            ck.set_rng_state(rng)
        state = TrainingState.from_dict({**state.to_dict(), **{k: v for k, v in saved.items()
                                                               if k not in ("max_steps", "identity", "num_processes")}})
        self.log(f"resuming from {ckpt} at step {state.global_step}")
        return state

    # ---- the loop's steps ----------------------------------------------------------------------
    def train_step(self, step: int, micro: list[dict], monitor) -> tuple[bool, float, float, float | None]:
        """Forward/backward over the micro-batches of one optimizer step, clip, update.
        (finite, mean loss, gradient norm, mean firing loss or None)."""
        acc, model = self.acc, self.model
        step_loss, firing = 0.0, None
        finite = True
        with monitor if monitor is not None else nullcontext():
            for m, batch in enumerate(micro):
                last = m == len(micro) - 1
                sync = nullcontext() if last or acc.num_processes == 1 else acc.no_sync(model)
                with sync:
                    with acc.autocast():
                        out = _forward_loss(model, batch, acc.device)
                    loss = self.hooks.on_loss(step, out.loss)
                    ok = torch.isfinite(loss.detach()).float()
                    if acc.num_processes > 1:
                        ok = acc.reduce(ok, reduction="mean")
                    if float(ok) < 1.0:
                        finite = False
                        break
                    acc.backward(loss / len(micro))
                step_loss += float(loss.detach()) / len(micro)
                if getattr(out, "firing_loss", None) is not None:
                    firing = (firing or 0.0) + float(out.firing_loss.detach()) / len(micro)
        grad_norm = float("nan")
        if finite:
            # max_norm inf measures without clipping (the scale factor is exactly 1)
            max_norm = self.args.max_grad_norm if self.args.max_grad_norm and self.args.max_grad_norm > 0 else math.inf
            norm = acc.clip_grad_norm_(model.parameters(), max_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if acc.scaler is None and not math.isfinite(grad_norm):
                finite = False
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()  # the schedule is a function of the step, skipped or not
        return finite, step_loss, grad_norm, firing

    def account(self, step: int, finite: bool) -> None:
        st = self.state
        if finite:
            return
        self.log(f"step {step}: non-finite loss or gradient, step skipped "
                 f"({st.nonfinite_in_a_row} in a row, {st.skipped_steps} in all)")
        if st.nonfinite_in_a_row >= self.args.max_consecutive_nonfinite:
            self.close()
            limit = self.args.max_consecutive_nonfinite
            raise TrainingError(f"{st.nonfinite_in_a_row} steps in a row (up to step {step}) had a non-finite loss or "
                                f"gradient; aborting (--max_consecutive_nonfinite {limit}). Lower --learning_rate, "
                                "raise --warmup_steps, or try --mixed_precision bf16/no; the last checkpoint is intact")

    def log_train(self, step: int, grad_norm: float, monitor, firing_losses: list[float]) -> None:
        acc, st = self.acc, self.state
        loss = st.window_loss()
        if acc.num_processes > 1:
            loss_t = torch.tensor(loss if st.window_steps else 0.0, dtype=torch.float32, device=acc.device)
            loss = float(acc.reduce(loss_t, reduction="mean")) if st.window_steps else float("nan")
        dt = time.perf_counter() - self.t_window
        metrics = {"loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                   "tokens_per_s": self.window_tokens / dt if dt > 0 else 0.0,
                   "firing_rate": monitor.mean_rate() if monitor is not None and monitor.totals else float("nan"),
                   "tokens": st.tokens_seen, "skipped_steps": st.skipped_steps,
                   "epoch": step * self.order.global_batch_size / self.order.num_blocks if not self.args.streaming
                   else -1.0}
        if firing_losses:
            metrics["firing_loss"] = sum(firing_losses) / len(firing_losses)
        self.emit("train", step, metrics)
        self.train_firing_rate = metrics["firing_rate"]
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                             tok_s=f"{metrics['tokens_per_s']:.0f}", fire=f"{metrics['firing_rate']:.3f}")
        if self.args.disable_tqdm:
            self.log(f"step {step}/{self.max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} "
                     f"tok/s {metrics['tokens_per_s']:.0f} firing {metrics['firing_rate']:.3f}")
        st.reset_window()
        self.window_tokens, self.t_window = 0, time.perf_counter()

    def emit(self, split: str, step: int, metrics: dict) -> None:
        self.logger.log(split, step, metrics)
        if self.main:
            self.hooks.on_log(split, step, metrics)

    def run_eval(self, step: int) -> dict:
        # a sharded forward needs the wrapper; DDP's would broadcast buffers on every call
        result = evaluate(self.model if self.sharded else self.unwrapped, self.eval_blocks, self.args, self.acc)
        self.state.last_eval = result
        self.emit("eval", step, result)
        return result

    def card(self, what: str | None) -> str:
        from ..models.model_card import model_card
        st = self.state
        facts = {"what": what, "tokens_seen": st.tokens_seen, "steps": st.global_step, "max_steps": self.max_steps,
                 "validation": st.last_eval, "train_firing_rate": self.train_firing_rate, **self.info}
        return model_card(self.unwrapped.config, self.n_params, facts)

    def save(self, step: int, what: str | None = None) -> Path:
        acc, st = self.acc, self.state
        st.data_position = self.order.position(step)
        state = dict(st.to_dict(), optimizer_keys="name" if self.sharded else "index")
        model_state = dist_.full_model_state(self.model, self.sharded)
        optim_state = dist_.full_optimizer_state(self.model, self.optimizer, self.sharded)
        path = ck.save_checkpoint(
            acc, self.out, step, model=self.unwrapped, model_state=model_state, tokenizer=self.tokenizer,
            optimizer_state=optim_state, scheduler_state=self.scheduler.state_dict(),
            scaler_state=acc.scaler.state_dict() if acc.scaler is not None else None, state=_jsonable(state),
            model_card=self.card(what or f"checkpoint at step {step}") if self.main else None,
            save_total_limit=self.args.save_total_limit, hooks=self.hooks)
        self.last_saved = step
        return path

    def stop_requested(self) -> int | None:
        signum = self.signals.received or 0
        if self.acc.num_processes > 1:  # every process stops at the same step
            t = torch.tensor([signum], dtype=torch.int64, device=self.acc.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            signum = int(t)
        return signum or None

    def interrupt(self, step: int, signum: int) -> None:
        path = self.out / f"checkpoint-{step}" if self.last_saved == step else self.save(step)
        self.close()
        name = signal.Signals(signum).name
        raise TrainingInterrupted(f"{name}: stopped after step {step} of {self.max_steps}; everything up to it is in "
                                  f"{path}. Resume with the same command and --resume_from_checkpoint latest",
                                  signum, step, path)

    # ---- the run -------------------------------------------------------------------------------
    def execute(self) -> dict:
        try:
            return self._execute()
        finally:
            self.close()

    def _execute(self) -> dict:
        from tqdm.auto import tqdm

        args, acc = self.args, self.acc
        t_start = time.perf_counter()
        self.prepare_output_dir()
        self.prepare_model()
        self.state = st = self.restore()
        start = st.global_step
        self.logger = MetricLogger(self.out, args.report_to, start, enabled=self.main, config=args.to_dict())
        name = type(self.unwrapped).__name__.removeprefix("FSDP")  # FSDP2 renames the class it shards
        self.log(f"{name} {self.n_params / 1e6:.2f}M parameters | "
                 f"{'streamed' if args.streaming else f'{self.order.num_blocks} train blocks'} of {self.block_size} "
                 f"tokens | global batch {self.order.global_batch_size} blocks ({self.tokens_per_step} tokens) | "
                 f"{self.max_steps} steps | {acc.num_processes} process(es) on {acc.device}"
                 + (" | FSDP" if self.sharded else ""))
        self.bar = tqdm(total=self.max_steps, initial=start, disable=not self.main or args.disable_tqdm,
                        dynamic_ncols=True, desc="train")
        self.model.train()
        self.window_tokens, self.t_window = 0, time.perf_counter()
        self.last_saved = start if self.resume is not None else -1
        firing_losses: list[float] = []
        batches = self.order.batches(start) if start < self.max_steps else iter(())
        with _StopSignals(self.log) as self.signals:
            for step0, micro in batches:
                step = step0 + 1  # steps are counted 1..max_steps; checkpoint-N holds the state after N steps
                log_now = step % args.logging_steps == 0 or step == self.max_steps
                monitor = FiringRateMonitor(self.unwrapped) if log_now else None
                finite, loss, grad_norm, firing = self.train_step(step, micro, monitor)
                st.record_step(finite, self.tokens_per_step, loss)
                self.window_tokens += self.tokens_per_step
                if firing is not None and finite:
                    firing_losses.append(firing)
                self.account(step, finite)
                self.bar.update(1)
                self.hooks.on_step_end(step, st)
                if log_now:
                    self.log_train(step, grad_norm, monitor, firing_losses)
                    firing_losses = []
                if self.eval_blocks is not None and args.eval_steps and step % args.eval_steps == 0 \
                        and step < self.max_steps:
                    r = self.run_eval(step)
                    if self.main:
                        self.bar.write(f"step {step}: eval loss {r['loss']:.4f} ppl {r['perplexity']:.2f}")
                if args.save_steps and step % args.save_steps == 0 and step < self.max_steps:
                    self.save(step)
                if step >= self.max_steps:
                    break
                signum = self.stop_requested()
                if signum:
                    self.interrupt(step, signum)
            self.bar.close()
            return self.finish(st.global_step, t_start)

    def finish(self, step: int, t_start: float) -> dict:
        args, acc, st = self.args, self.acc, self.state
        final_eval = None
        if self.eval_blocks is not None:
            final_eval = self.run_eval(step)
            self.log(f"final eval (step {step}): loss {final_eval['loss']:.4f} "
                     f"perplexity {final_eval['perplexity']:.2f}")
        if self.last_saved != step:
            self.save(step)
        self.save_final()
        self.close()
        sample = self.sample()
        elapsed = time.perf_counter() - t_start
        summary = {"steps": step, "skipped_steps": st.skipped_steps, "final_eval": final_eval, "seconds": elapsed,
                   "parameters": self.n_params, "tokens_seen": st.tokens_seen, "sample": sample}
        if self.main:
            _write_json(self.out / "train_summary.json", _jsonable(summary))
        self.log(f"done: {step} steps in {elapsed:.1f}s; model{' and tokenizer' if self.tokenizer else ''} in "
                 f"{self.out}")
        return summary

    def save_final(self) -> None:
        """The final model (and tokenizer and card) in output_dir itself, each file replaced atomically."""
        model_state = dist_.full_model_state(self.model, self.sharded)
        if self.main:
            tmp = self.out / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                self.unwrapped.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(tmp)
                (tmp / "README.md").write_text(self.card(None))
                _fsync_files(tmp)
                for p in sorted(tmp.iterdir()):
                    os.replace(p, self.out / p.name)
                ck._fsync_dir(self.out)
            except Exception as e:  # noqa: BLE001  (safetensors and torch raise their own types for OS errors)
                raise ck.CheckpointWriteError(f"could not write the final model into {self.out} ({e}); the last "
                                              f"checkpoint {ck.latest_checkpoint(self.out)} is intact") from e
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        self.acc.wait_for_everyone()

    def sample(self) -> str | None:
        args = self.args
        if not (args.sample_prompt and args.sample_max_new_tokens > 0 and self.main and self.tokenizer is not None):
            return None
        model = self.unwrapped
        if self.sharded:  # generate on a plain copy of the saved model (a sharded forward is collective)
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(self.out, dtype=torch.float32)
        text = sample_text(model, self.tokenizer, args.sample_prompt, args.sample_max_new_tokens, args.seed)
        print(f"sample: {text}")
        return text

    def close(self) -> None:
        """Closes the progress bar and the trackers (idempotent)."""
        if getattr(self, "bar", None) is not None:
            self.bar.close()
        if getattr(self, "logger", None) is not None:
            self.logger.close()


def _fsync_files(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    # dense products: a short sample does not repay building the event-driven op's C++ kernel (~14 s on first use)
    with torch.random.fork_rng(), sparse_mode_as(model, "off"):
        torch.manual_seed(seed)
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def command_line() -> str:
    """How this process was started, for the model card."""
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else (sys.argv[0] if sys.argv else "")]
    return "python " + shlex.join(argv + sys.argv[1:])
