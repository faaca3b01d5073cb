"""The ranks one model is split over (tensor parallelism) and the collectives its layers need.

`ParallelGroup` itself is one rank alone: every collective is the identity, so an engine with
`tensor_parallel_size=1` runs without torch.distributed and pays nothing for it. `ProcessGroups`
is a rank of a group of processes: explicit process-group objects (no torch.distributed global
state, so engines in one process never share or clash over it), one for tensors (NCCL on CUDA,
gloo on the CPU) and one for control messages (gloo, host tensors), both over a TCP store on the
loopback that rank 0 hosts. A peer that dies closes its sockets, so a collective waiting on it
fails at once (gloo: "Connection reset by peer") instead of waiting out the timeout, which only
bounds a peer that hangs alive.
"""

from __future__ import annotations

import datetime
import socket
from typing import Any

import torch
import torch.distributed as dist

COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
"""How long a collective waits for a live peer (a step's compute on a large model included)."""
CONNECT_TIMEOUT = datetime.timedelta(seconds=120)
"""How long the ranks take to find each other through the store."""
IDLE_TIMEOUT = datetime.timedelta(days=365)
"""The control group's timeout: a worker waits for the next step as long as the engine idles
(it learns of rank 0's end from its closed connection, not from a timeout)."""


class ParallelGroup:
    """A group of one rank: the collectives return their input."""

    rank: int = 0
    world_size: int = 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise sum over the ranks, in place; returns `t`."""
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum over the ranks, in place; returns `t`."""
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's `t` (same shape on all), concatenated along the last dim in rank order."""
        return t

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's `t` (a device tensor) into every rank's `t` of the same shape; returns it."""
        return t

    def broadcast_control(self, t: torch.Tensor) -> torch.Tensor:
        """`broadcast` of a host tensor over the control group."""
        return t

    def close(self) -> None:
        """Release the group's connections (idempotent)."""


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (rank 0's store takes it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ProcessGroups(ParallelGroup):
    """Rank `rank` of `world_size` processes on this host, meeting at 127.0.0.1:`port` (rank 0
    hosts the store). Tensors of `device` go through NCCL when it is a CUDA device (the process
    must have made it current), else gloo."""

    def __init__(self, rank: int, world_size: int, port: int, device: torch.device) -> None:
        self.rank, self.world_size = rank, world_size
        self._store = dist.TCPStore(
            "127.0.0.1",
            port,
            world_size,
            is_master=rank == 0,
            timeout=CONNECT_TIMEOUT,
            wait_for_workers=False,
        )
        # Any: torch's stubs of the backends lack their collectives.
        self._control: Any = _gloo(dist.PrefixStore("control", self._store), rank, world_size)
        tensor_store = dist.PrefixStore("tensor", self._store)
        self._tensor: Any
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = COLLECTIVE_TIMEOUT
            self._tensor = dist.ProcessGroupNCCL(tensor_store, rank, world_size, options)
        else:
            self._tensor = _gloo(tensor_store, rank, world_size, COLLECTIVE_TIMEOUT)
        self._closed = False

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.SUM)

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(t, dist.ReduceOp.MAX)

    def _all_reduce(self, t: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
        options = dist.AllreduceOptions()
        options.reduceOp = op
        self._tensor.allreduce([t], options).wait()
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._tensor.allgather([parts], [t]).wait()
        return torch.cat(parts, dim=-1)

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        self._tensor.broadcast(t, 0).wait()
        return t

    def broadcast_control(self, t: torch.Tensor) -> torch.Tensor:
        self._control.broadcast(t, 0).wait()
        return t

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # The store goes with the last rank that holds it.
        for group in (self._tensor, self._control):
            group.shutdown()


def _gloo(
    store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta = IDLE_TIMEOUT
) -> dist.ProcessGroupGloo:
    options = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    options._timeout = timeout
    # The loopback by address: the host name need not resolve.
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(store, rank, world_size, options)
