"""Sharded training (`train.distributed=fsdp`): PyTorch FSDP2 (`fully_shard`) through Accelerate's plugin.

Each of N processes holds 1/N of every weight, gradient, AdamW moment and EMA weight; a block's full weights
exist only while it computes. What the trainer does with it:

- wrapping: every `TransformerBlock` (the prior, the decoder's text layers) and every `EmbedSequential` (a
  U-Net level's block) is its own FSDP unit, gathered just before it runs and freed after; the root unit holds
  the rest (embeddings, input and output layers);
- mixed precision: Accelerate's policy for FSDP: compute in bf16 or fp16, fp32 weights, gradients and
  reductions;
- activation checkpointing: the networks' own (`train.gradient_checkpointing`), as without FSDP;
- EMA: a copy of the network sharded like it, updated shard by shard on each process (ema-pytorch);
- checkpoints are gathered: the full weights, EMA and optimizer state are collected on the main process and
  written in the same files as a single-process run's (unclip/training/state.py), so a run resumes exactly with
  the same process count, and also with another count or without FSDP (with a different data order). On a
  resume every process reads the files and keeps its shard.

Accelerate switches FSDP on only for accelerators (CUDA and the like). Between CPU processes (gloo), as the tests
run, the trainer sets Accelerate's state to FSDP itself; Accelerate's FSDP2 code then runs as on GPUs.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

# the blocks that become FSDP units, where a network has them
UNIT_CLASSES = ("TransformerBlock", "EmbedSequential")
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors on the main process's CPU
COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FROM_FULL = StateDictOptions(full_state_dict=True)  # every process passes the full state and keeps its shard


def fsdp_plugin(mixed_precision: str) -> FullyShardedDataParallelPlugin:
    """Accelerate's FSDP2 plugin as the trainer uses it (the units are chosen per network by `wrap_units`). With
    mixed precision, blocks compute in bf16 or fp16 and gradients are reduced in fp32 (Accelerate's own policy
    would reduce them in the compute dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = None
    if mixed_precision != "no":
        policy = MixedPrecisionPolicy(param_dtype=COMPUTE_DTYPES[mixed_precision], reduce_dtype=torch.float32)
    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        reshard_after_forward=True,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(UNIT_CLASSES),
        state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False,
        mixed_precision_policy=policy,
    )


def enable_on_cpu(accelerator: Accelerator, plugin: FullyShardedDataParallelPlugin) -> None:
    """Switch a multi-process CPU (gloo) Accelerator to FSDP, which Accelerate enables only on accelerators."""
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    state = AcceleratorState()
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the run is sharded; Accelerate's FSDP1 (from an `accelerate config` choosing version 1) is refused."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    if not accelerator.is_fsdp2:
        raise ValueError(
            "the trainer shards with FSDP2: set fsdp_version: 2 in the accelerate config (or leave FSDP out of it "
            "and set train.distributed=fsdp)"
        )
    return True


def wrap_units(accelerator: Accelerator, model: nn.Module) -> None:
    """Make the network's blocks FSDP units (Accelerate refuses a class name the network lacks)."""
    present = {type(m).__name__ for m in model.modules()}
    accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = [n for n in UNIT_CLASSES if n in present]


def prepare(accelerator: Accelerator, model: nn.Module, optimizer, loader) -> tuple:
    """Accelerate's prepare, sharded; returns (model, optimizer, loader, the EMA's sharded copy of the network,
    a whole copy on the main process's CPU for export and evaluation, None elsewhere)."""
    wrap_units(accelerator, model)
    ema_model = copy.deepcopy(model)
    plain = plain_copy(model) if accelerator.is_main_process else None
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return model, optimizer, loader, shard_like(accelerator, ema_model), plain


def shard_like(accelerator: Accelerator, copy_of_model: nn.Module) -> nn.Module:
    """Shard a copy of the (unsharded) network over the processes as FSDP shards the network itself, for the EMA:
    each process averages its own shards."""
    from torch.distributed.fsdp import fully_shard

    copy_of_model.requires_grad_(False)
    mesh = getattr(accelerator, "torch_device_mesh", None)
    fully_shard(copy_of_model, mesh=mesh)
    return copy_of_model


def plain_copy(model: nn.Module) -> nn.Module:
    """A full, unsharded copy on the CPU, made before sharding: the EMA's and evaluation's module on the main
    process, into which gathered weights are loaded."""
    return copy.deepcopy(model).cpu().requires_grad_(False)


# -- gathering and scattering the training state ---------------------------------------------------------------


def gather_model(model: nn.Module) -> dict[str, Tensor]:
    """The full state dict on the main process (empty on the others); every process must call it."""
    return get_model_state_dict(model, options=GATHERED)


def gather_ema(ema) -> dict[str, Tensor]:
    """The EMA's state dict in ema-pytorch's layout (its counters and `ema_model.*`), full on the main process."""
    weights = gather_model(ema.ema_model)
    return {"initted": ema.initted.cpu(), "step": ema.step.cpu(), **{f"ema_model.{k}": v for k, v in weights.items()}}


def gather_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state dict keyed by parameter index, as an unsharded optimizer's is."""
    state = get_optimizer_state_dict(model, _unwrap(optimizer), options=GATHERED)
    index = {name: i for i, name in enumerate(_trained_names(model))}
    groups = [{**g, "params": [index[name] for name in g["params"]]} for g in state.get("param_groups", [])]
    return {"state": {index[name]: values for name, values in state.get("state", {}).items()}, "param_groups": groups}


def gather_all(model: nn.Module, ema, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """The full state dicts of the network, its EMA and the optimizer, on the main process."""
    return gather_model(model), gather_ema(ema), gather_optimizer(model, optimizer)


def load_ema_into(module: nn.Module, gathered_ema: dict[str, Tensor]) -> nn.Module:
    """Load the EMA weights of a gathered EMA state (gather_ema's) into a whole module."""
    prefix = "ema_model."
    module.load_state_dict({k[len(prefix) :]: v for k, v in gathered_ema.items() if k.startswith(prefix)})
    return module


def load_model(model: nn.Module, full: dict[str, Tensor]) -> None:
    set_model_state_dict(model, full, options=FROM_FULL)


def load_ema(ema, full: dict[str, Tensor]) -> None:
    prefix = "ema_model."
    weights = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
    others = {k for k in full if not k.startswith(prefix)}
    if others != {"initted", "step"}:
        raise KeyError(f"the EMA state holds {sorted(others)} besides its weights, not its counters initted and step")
    set_model_state_dict(ema.ema_model, weights, options=FROM_FULL)
    ema.initted.copy_(full["initted"])
    ema.step.copy_(full["step"])


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
    """Load an index-keyed full optimizer state (gather_optimizer's, or an unsharded run's)."""
    names = _trained_names(model)
    state = {names[int(i)]: values for i, values in full["state"].items()}
    groups = [{**g, "params": [names[int(i)] for i in g["params"]]} for g in full["param_groups"]]
    set_optimizer_state_dict(model, _unwrap(optimizer), {"state": state, "param_groups": groups}, options=FROM_FULL)


def load_checkpoint(model: nn.Module, ema, optimizer: torch.optim.Optimizer, loaded) -> None:
    """Every process takes its shards of a checkpoint's full state (a TrainingState, which it has read whole)."""
    from unclip.training.state import CheckpointError

    for name, load in (
        ("model.safetensors", lambda: load_model(model, loaded.model)),
        ("ema.safetensors", lambda: load_ema(ema, loaded.ema)),
        ("optimizer.safetensors", lambda: load_optimizer(model, optimizer, loaded.optimizer)),
    ):
        try:
            load()
        except (RuntimeError, ValueError, KeyError, IndexError) as e:
            message = " ".join(str(e).split())
            raise CheckpointError(f"{loaded.path / name} does not fit this run ({message[:500]})") from None


def loaded_copy(module: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A copy of a whole module holding `state` (the gathered online weights, for an evaluation)."""
    duplicate = copy.deepcopy(module)
    duplicate.load_state_dict(state)
    return duplicate


def full_value(tensor: Tensor) -> Tensor:
    """A DTensor's full value (e.g. a gradient norm); other tensors as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _trained_names(model: nn.Module) -> list[str]:
    """The names of the parameters the optimizer holds, in its order (the trainer gives it these)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one
