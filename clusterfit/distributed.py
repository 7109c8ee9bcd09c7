"""torch.distributed set-up from the `env://` variables (torchrun, the PyTorchJob operator).

Processes belong to the platform: this module joins the process group the environment describes
and never spawns ranks or writes RANK. One process when nothing is set.
"""

from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clusterfit.runtime import Ranks, check_requested_gpus, ranks_from_env


@dataclass(frozen=True)
class Dist:
    ranks: Ranks
    device: torch.device

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world_size(self) -> int:
        return self.ranks.world_size

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main


def init_distributed(backend: str = "auto", timeout_s: float = 600.0) -> Dist:
    """Join the process group described by env:// (gloo on CPU, nccl on CUDA); one process when unset.
    `timeout_s` (DISTRIBUTED.TIMEOUT_S) bounds the wait for the other ranks, here and in every collective."""
    ranks = ranks_from_env()
    with warnings.catch_warnings(record=True) as said:  # torch says why CUDA is unusable (an old driver) only here
        warnings.simplefilter("always")
        cuda = torch.cuda.is_available()
    check_requested_gpus(
        torch.cuda.device_count() if cuda else 0, "torch", torch.version.cuda, "; ".join(str(w.message) for w in said)
    )
    if cuda:
        device = torch.device("cuda", ranks.local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if ranks.distributed and not dist.is_initialized():
        chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(chosen, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and ranks.distributed:
        # Ranks sharing one machine's cores would otherwise oversubscribe them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(ranks.world_size, 1)))
    return Dist(ranks, device)


def all_sum(values: list[int], device: torch.device) -> list[int]:
    """`values` summed element-wise over every rank (as they are on one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    totals = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(totals)
    return [int(n) for n in totals.tolist()]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
