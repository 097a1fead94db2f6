"""Training on several processes: the process group of a run that torchrun started, and the few collectives
training needs (means, maxima, gathers, broadcasts), plus the command that starts such a run.

torchrun (``python -m torch.distributed.run``) sets RANK, WORLD_SIZE and LOCAL_RANK in each process it
starts; without them a run is one plain process and every helper here is a no-op (a world of one).
Backend: NCCL when the run trains on CUDA (one GPU per process), gloo on the CPU.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# Rank 0 alone evaluates on the test split and writes the model while the others wait: generous, so a slow
# save on a big test set is not mistaken for a dead peer.
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """Where this process stands in the run: rank ``rank`` of ``size`` (``local_rank`` on this machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes checkpoints, reports and registry rows."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` rows (the shares cover them once, in rank order)."""
        per, extra = divmod(n, self.size)
        start = self.rank * per + min(self.rank, extra)
        return slice(start, start + per + (self.rank < extra))

    # collectives: identity in a world of one
    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """Average ``t`` over the ranks, in place (and returned)."""
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.size
        return t

    def max(self, value: float) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def average_buffers(self, module: torch.nn.Module) -> None:
        """Average the floating-point buffers (BatchNorm running statistics): each rank updated them on its own
        share of the batches, and validation or the saved model must not depend on which rank's they are."""
        if self.size == 1:
            return
        for b in module.buffers():
            if b.is_floating_point():
                self.mean_(b.data)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def launched() -> bool:
    """Whether torchrun started this process (with more than one process in the run)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main() -> bool:
    """Rank 0, or a plain single process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def current() -> World:
    """The running process group's view (a world of one without one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                 int(os.environ.get("LOCAL_WORLD_SIZE", str(dist.get_world_size()))))


def backend_for(device: str) -> str:
    """NCCL for a run on CUDA, gloo for one on the CPU (``device`` as TrainConfig.device: auto, cpu, cuda[:n])."""
    return "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"


def init(device: str = "auto") -> World:
    """Join the process group torchrun's variables describe (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
    a world of one when they are absent. On CUDA each process takes the GPU of its LOCAL_RANK."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched():
        return World()
    backend = backend_for(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"process {local_rank} has no GPU of its own ({torch.cuda.device_count()} visible): "
                               "start at most one process per GPU")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, timeout=TIMEOUT)
    return current()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(device: str = "auto") -> Iterator[World]:
    """The run's process group for the block: joined here (and left at its end) when torchrun started this
    process and nobody joined yet; the caller's when it joined already; a world of one otherwise."""
    owner = launched() and not (dist.is_available() and dist.is_initialized())
    world = init(device)
    try:
        yield world
    finally:
        if owner:
            teardown()


def torchrun_command(nproc: int, module: str, args: list[str]) -> list[str]:
    """The command that runs ``python -m module args`` in ``nproc`` processes on this machine (torchrun,
    standalone rendezvous: a free local port, nothing to configure)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", module, *args]
