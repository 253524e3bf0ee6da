"""Sharded data parallelism (FSDP) and the full state dicts a checkpoint holds under any wrapping.

accelerate shards a model with FSDP on GPUs only: its AcceleratorState turns a requested FSDP into
DistributedType.FSDP for MULTI_GPU (and other accelerator) setups, while a CPU run stays MULTI_CPU and
`prepare` wraps the model in DDP (and `accelerate launch` refuses `--cpu` with `--use_fsdp`). torch's
FSDP2 (`fully_shard`) works on CPU with gloo, so when `accelerate launch --use_fsdp` starts CPU
processes (with --fsdp_version 2: accelerate's FSDP1 plugin cannot even be built without a GPU,
since its sync_module_states asks for the current GPU device), the model is sharded here with FSDP2
the way accelerate shards it on GPUs: every transformer block (the model's `_no_split_modules`),
then the root.

Checkpoints hold full (unsharded) state dicts gathered with torch.distributed.checkpoint's
get_*_state_dict, which understand plain modules, DDP, FSDP1 and FSDP2 alike, so a checkpoint does
not depend on how the run was wrapped.
"""
from __future__ import annotations

import os

import torch


def fsdp_requested(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or (
        accelerator.distributed_type == DistributedType.MULTI_CPU
        and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true")


def cpu_fsdp1_requested() -> bool:
    """`accelerate launch --use_fsdp` without --fsdp_version 2 on a machine without a GPU: accelerate's
    FSDP1 plugin then fails in its constructor (sync_module_states asks for a current GPU device)."""
    return (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_VERSION", "1") != "2" and not torch.cuda.is_available())


def shard_on_cpu(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """FSDP2 over all processes: each `_no_split_modules` block is one shard group, the rest the root's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (accelerator.num_processes,))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def full_model_state(model: torch.nn.Module, sharded: bool) -> dict | None:
    """The full model state dict on the main process (None elsewhere); None also means "the module's own
    state_dict()" for an unsharded model. Every process must call it when sharded."""
    if not sharded:
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    sd = get_model_state_dict(model, options=_options())
    # a tied weight comes back under each of its names: keep the first, as save_pretrained does unsharded
    canonical = {n for n, _ in model.named_parameters()}
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - canonical
    return {k: v for k, v in sd.items() if k not in aliases} or None


def full_optimizer_state(model: torch.nn.Module, optimizer, sharded: bool) -> dict | None:
    """The optimizer's state dict, keyed by parameter index as torch.optim saves it; under FSDP gathered
    in full onto the main process (collective: every process calls it)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if not sharded:
        return inner.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(model, inner, options=_options()) or None


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict | None, sharded: bool) -> None:
    """The inverse of full_optimizer_state: under FSDP the main process's full state is scattered to the
    shards (the other processes pass None)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    # the implementation (fused, foreach) is this run's choice, not the saved one: load_state_dict takes the saved
    # groups' (an older checkpoint's fused=None would turn the fused update off) and places the step counters by it
    # (a fused update on CUDA needs them on the device), so the saved groups are given this run's choice first
    chosen = [{k: g.get(k) for k in ("fused", "foreach")} for g in inner.param_groups]
    if state and state.get("param_groups") and len(state["param_groups"]) == len(chosen):
        state = dict(state, param_groups=[dict(g, **keep) for g, keep in zip(state["param_groups"], chosen)])
    if not sharded:
        inner.load_state_dict(state)
    else:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(model, inner, state or {}, options=_options(broadcast_from_rank0=True))
    for group, keep in zip(inner.param_groups, chosen):
        group.update(keep)


def is_sharded(model: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP1
    except ImportError:
        return False
    return isinstance(model, (FSDPModule, FSDP1)) or any(isinstance(m, FSDP1) for m in model.modules())
