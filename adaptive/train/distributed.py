"""Data-parallel training: process-group set-up, DDP / FSDP2 wrapping, full-state checkpoints.

Launch with ``torchrun --nproc-per-node N -m adaptive train RECIPE``; ``train.distributed.strategy``
picks ``ddp`` or ``fsdp2`` (``fully_shard`` on the parts of each physical layer block, then on the root;
see ``AdaptiveLM.fsdp_units``).

Contract with the model (and its routers) for routing state that lives outside autograd:
after every optimizer step the trainer calls ``model.after_optimizer_step(stats)`` on the unwrapped
model on *every* process, with the RoutingStats of that process's micro-batches. When
``torch.distributed`` is initialized, the model/routers all-reduce whatever they aggregate from the
stats (e.g. per-depth token loads for a loss-free balancing bias) before updating their buffers, so the
buffers stay identical on every process; the trainer does not touch router buffers itself. Those
buffers are persistent, so they travel in the state dict and hence in every checkpoint. FFNs get the
same treatment through ``FFN.after_optimizer_step(counts)``, with the ``FFNOutput.counts`` of their own
calls (e.g. an MoE all-reduces its tokens per expert before updating its loss-free bias).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from adaptive.errors import RecipeError
from adaptive.train.config import TrainConfig


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1 or dist.is_initialized()


def pick_device(cfg: TrainConfig, local_rank: int) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RecipeError([f"train.device: {cfg.device!r} but CUDA is not available (use auto or cpu)"])
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(cfg: TrainConfig) -> DistInfo:
    """Read torchrun's environment, pick the device and initialise the process group when needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    strategy = cfg.distributed.strategy
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if world > 1 and strategy == "none":
        raise RecipeError([f"train.distributed.strategy: 'none' but {world} processes were launched (use ddp or fsdp2)"])
    device = pick_device(cfg, local_rank)
    info = DistInfo(rank, world, local_rank, strategy, device)
    if strategy == "none":
        return info
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = cfg.distributed.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return info


def teardown(info: DistInfo) -> None:
    if info.strategy != "none" and dist.is_initialized():
        dist.destroy_process_group()


def fsdp_units(model: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """FSDP2 units below the root, with the methods through which the model runs their parameters
    (``AdaptiveLM.fsdp_units``)."""
    return list(model.fsdp_units())


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """The model the training step calls: as is, in DDP, or sharded with FSDP2 (in place)."""
    if info.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if info.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(info.device.type, (info.world,))
        for unit, methods in fsdp_units(model):
            fully_shard(unit, mesh=mesh)
            for method in methods:
                if method != "forward":
                    register_fsdp_forward_method(unit, method)
        fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


@contextlib.contextmanager
def no_sync(model: nn.Module, info: DistInfo, active: bool):
    """Skip the gradient all-reduce on accumulation micro-steps before the last one."""
    if active and info.strategy == "ddp":
        with model.no_sync():
            yield
    elif active and info.strategy == "fsdp2":
        unwrap(model).set_requires_gradient_sync(False)
        try:
            yield
        finally:
            unwrap(model).set_requires_gradient_sync(True)
    else:
        yield


@contextlib.contextmanager
def gathered(model: nn.Module, info: DistInfo):
    """Inside: the model runs without collectives (evaluation may route each process differently).

    Under FSDP2 every unit is all-gathered once and kept unsharded until the end; callers then use
    ``unwrap(model)``, which bypasses DDP's per-forward buffer broadcast.
    """
    if info.strategy != "fsdp2":
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def all_reduce_(tensor: torch.Tensor, info: DistInfo, op: str = "sum") -> torch.Tensor:
    if info.strategy != "none":
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def barrier(info: DistInfo) -> None:
    if info.strategy != "none":
        dist.barrier()


@contextlib.contextmanager
def main_first(info: DistInfo):
    """Run the body on the main process first (it fills caches), then on the others."""
    if not info.is_main:
        barrier(info)
    yield
    if info.is_main:
        barrier(info)


def model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on the main process; a collective under FSDP2."""
    if info.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], info: DistInfo) -> None:
    if info.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(unwrap(model), state, options=StateDictOptions(full_state_dict=True))
        return
    unwrap(model).load_state_dict(state)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo) -> dict:
    if info.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(unwrap(model), optimizer, options=options)
    return optimizer.state_dict()


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, info: DistInfo) -> None:
    if info.strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(unwrap(model), optimizer, state, options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(state)
