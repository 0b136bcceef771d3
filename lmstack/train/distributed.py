"""Multi-device training through torch.distributed: DDP or FSDP2, set up from torchrun's env.

The same command runs on one device or under `torchrun --nproc_per_node N`: `Dist` reads
RANK/WORLD_SIZE/LOCAL_RANK, starts the process group (NCCL on GPUs, gloo on CPUs) and offers the
few collectives the trainer needs. Full (unsharded) state dicts are gathered onto rank 0 with
`torch.distributed.checkpoint.state_dict`, so FSDP checkpoints are ordinary HF directories.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmstack.errors import CheckpointError, ConfigError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    started_here: bool = False  # we created the process group, so we destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- collectives (no-ops on one process) ---------------------------------------------
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_min(self, value: int) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.started_here and dist.is_initialized():
            dist.barrier()  # no rank tears down while another still talks to it (an abort at exit)
            dist.destroy_process_group()


def resolve_device(name: str | None) -> torch.device:
    """--device: auto (CUDA when present), cpu, cuda or cuda:N, checked against this machine."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not a device lmstack runs on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} but CUDA is not available here; use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"--device {name} but this machine has {count} CUDA device(s) "
                              f"(cuda:0..cuda:{count - 1}); use one of those or --device auto")
    return device


def setup(device_name: str = "auto") -> Dist:
    """Read torchrun's environment and start the process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if world_size > 1 or device.index is None else device.index)
        torch.cuda.set_device(device)
    if world_size == 1:
        return Dist(device=device)
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
        started = True
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device, started_here=started)


def wrap_model(model: nn.Module, strategy: str, d: Dist) -> nn.Module:
    """DDP or FSDP2 around `model` (one process: the model itself). FSDP shards every block, then the root."""
    if not d.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(model: nn.Module, raw_model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step.

    `model` is what the step calls (maybe DDP around a compiled module), `raw_model` the
    module itself (the FSDP module when sharded, even when compiled).
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    if is_fsdp(raw_model):
        raw_model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def full_model_state(model: nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The unsharded model weights on CPU (on rank 0; other ranks get {} under FSDP)."""
    if not is_fsdp(model):
        return {k: v.detach() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter names, unsharded, on CPU (rank 0 under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         source: object = "the checkpoint") -> None:
    """Inverse of `full_optimizer_state`; every rank passes the same full state and keeps its shard.

    Each moment must have its parameter's shape: torch does not check, and the fused AdamW then
    writes past the end of a smaller one (heap corruption, not an error)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    params = dict(model.named_parameters())
    for name, entries in state.get("state", {}).items():
        param = params.get(name)
        for key, value in entries.items():
            if param is not None and torch.is_tensor(value) and value.dim() and value.shape != param.shape:
                raise CheckpointError(
                    f"optimizer state {key} of parameter {name} in {source} has shape {tuple(value.shape)} but the "
                    f"parameter has shape {tuple(param.shape)}; resume with the model options the checkpoint was "
                    "written with (its trainer_state/train_config.yaml), or use another --out_dir"
                )
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
