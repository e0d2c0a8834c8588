"""The tensor-parallel group of this process: its rank, size, and collectives.

One group per process, set once by the worker before its model is built (as vLLM's
parallel_state does): the parallel layers read the rank and size when they are
constructed and call all_reduce / all_gather in their forward. A process that never
joins a group is rank 0 of 1 and every collective is a no-op.

Collectives go through a shared-memory communicator when every rank is on this host
and it builds here (measured: `freight bench allreduce`), and through torch.distributed
(gloo on CPU, NCCL on CUDA) otherwise. Both give every rank bit-identical results,
which the ranks rely on: each runs the sampler on the same gathered logits, and then takes
rank 0's tokens, so a sampler that is not bit-reproducible (e.g. on a GPU) cannot make the
ranks' token histories, and so their next inputs, drift apart.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Optional

import msgspec
import torch

logger = logging.getLogger(__name__)

_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


class DistributedInit(msgspec.Struct):
    """How a rank joins its group: plain data, sent to each worker process or actor."""

    init_method: str            # tcp://host:port of rank 0's store
    world_size: int
    backend: str                # gloo or nccl
    shm_name: Optional[str]     # shared-memory segment for one-host groups; None: torch.distributed only


@dataclass
class TensorParallelGroup:
    rank: int = 0
    world_size: int = 1
    shm: Optional[object] = None  # ShmCommunicator when collectives go through shared memory

    @property
    def collective_path(self) -> str:
        if self.world_size == 1:
            return "none"
        return "shm" if self.shm is not None else torch.distributed.get_backend()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns x."""
        if self.world_size == 1:
            return x
        if self.shm is not None and x.device.type == "cpu":
            return self.shm.all_reduce(x)
        torch.distributed.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' tensors concatenated along dim (rank order)."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        if self.shm is not None and x.device.type == "cpu":
            return self.shm.all_gather(x, dim)
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, x)
        return torch.cat(parts, dim=dim)


    def broadcast_from_rank0(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (x has the same shape everywhere)."""
        if self.world_size == 1:
            return x
        if self.shm is not None and x.device.type == "cpu":
            return self.shm.all_gather(x.contiguous(), 0)[:x.shape[0]]
        x = x.contiguous()
        torch.distributed.broadcast(x, src=0)
        return x


_GROUP = TensorParallelGroup()


def get_tp_group() -> TensorParallelGroup:
    return _GROUP


def init_tensor_parallel(rank: int, init: DistributedInit) -> TensorParallelGroup:
    """Join the group (blocks until every rank has); set this process's group."""
    global _GROUP
    import torch.distributed as dist

    if init.backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ and "//127.0.0.1:" in init.init_method:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # all ranks on this host: loopback, whatever the hostname says
    dist.init_process_group(init.backend, init_method=init.init_method, rank=rank, world_size=init.world_size,
                            timeout=_COLLECTIVE_TIMEOUT)
    shm = _open_shm(rank, init) if init.shm_name else None
    _GROUP = TensorParallelGroup(rank, init.world_size, shm)
    logger.info("rank %d of %d joined (%s collectives)", rank, init.world_size, _GROUP.collective_path)
    return _GROUP


def _open_shm(rank: int, init: DistributedInit):
    """The shared-memory communicator if every rank can open one, else None (all ranks agree)."""
    import torch.distributed as dist

    comm = None
    if os.environ.get("FREIGHT_TP_COLLECTIVES", "auto") != "gloo":
        try:
            from freight.distributed.shm_comm import ShmCommunicator

            if ShmCommunicator.available():
                comm = ShmCommunicator(init.shm_name, rank, init.world_size)
        except Exception as e:  # no compiler, no /dev/shm...: torch.distributed it is
            logger.warning("shared-memory collectives unavailable (%s); using %s", e, init.backend)
            comm = None
    ok = torch.tensor([1 if comm is not None else 0])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() == 1:
        if rank == 0:  # every rank has it mapped: drop the name now, so no crash can leave it in /dev/shm
            with contextlib.suppress(FileNotFoundError):
                os.unlink(comm.path)
        return comm
    if comm is not None:
        comm.close()
    return None


def destroy_tensor_parallel() -> None:
    global _GROUP
    if _GROUP.shm is not None:
        _GROUP.shm.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _GROUP = TensorParallelGroup()


def abort_collectives() -> None:
    """Make ranks stuck in a shared-memory collective raise (a peer died)."""
    if _GROUP.shm is not None:
        _GROUP.shm.abort()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on host now, for a group's rendezvous."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split_units(total: int, world_size: int, rank: int) -> tuple[int, int]:
    """This rank's (first, count) of `total` units (heads, channels): an even split, or for fewer
    units than ranks (KV heads) one replicated unit per rank, rank r holding unit r * total // world."""
    if total >= world_size:
        if total % world_size:
            raise ValueError(f"{total} cannot be split evenly over {world_size} tensor-parallel ranks")
        count = total // world_size
        return rank * count, count
    if world_size % total:
        raise ValueError(f"{total} KV heads cannot be replicated evenly over {world_size} tensor-parallel ranks")
    return rank * total // world_size, 1
