"""Optimize stage, scale-out: torchrun's process group, each rank's share of a batch, and sums across ranks.

``cstar compile`` runs unchanged under ``torchrun --nproc-per-node N`` (``cstar compile --nproc N``
launches exactly that): every rank trains a ``DistributedDataParallel`` copy on its share of each
global batch, attacks its own share, and computes the ADMM Z/U updates from the same (synchronized)
weights; rank 0 then broadcasts them so that every rank holds bit-identical Z and U. Only rank 0
writes checkpoints and artifacts. With one process none of this is active.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (one rank when not under torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment(environment: Mapping[str, str] | None = None) -> World:
    """The world torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK (one rank when unset)."""
    environment = os.environ if environment is None else environment
    size = int(environment.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(environment["RANK"]), size, int(environment.get("LOCAL_RANK", "0")))


def start(world: World, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, gloo on CPUs. Rendezvous is torchrun's own."""
    if world.active and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def stop(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.destroy_process_group()


def device_for(world: World, device: torch.device) -> torch.device:
    """Each rank on its own GPU; CPU ranks share the CPU."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.active else device


def share(indices: Tensor, world: World) -> Tensor:
    """This rank's share of one global batch: every ``size``-th example from ``rank`` on."""
    return indices[world.rank::world.size] if world.active else indices


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """The module that takes training steps: a DistributedDataParallel copy when several ranks train."""
    if not world.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def sum_all(values: Sequence[float], world: World) -> list[float]:
    """Each value summed over every rank (float64, so counts stay exact)."""
    if not world.active:
        return list(values)
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(list(values), dtype=torch.float64, device=backend_device)
    dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def broadcast(tensors: Iterable[Tensor], world: World) -> None:
    """Overwrite each tensor, in place, with rank 0's."""
    if world.active:
        for tensor in tensors:
            dist.broadcast(tensor, src=0)


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def launch(arguments: Sequence[str], processes: int) -> NoReturn:
    """Become ``torchrun --standalone --nproc-per-node processes -m cstar_dsl <arguments>``.

    The process is replaced (exec), not wrapped, so that a signal sent to it (Ctrl-C, a scheduler's
    SIGTERM) reaches torchrun, which stops every rank. For several machines, run torchrun yourself.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "cstar_dsl", *arguments]
    sys.stdout.flush()
    os.execv(sys.executable, command)
