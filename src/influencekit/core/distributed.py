"""Sharding the training set across the processes of a ``torch.distributed`` group (gloo on CPU, nccl on GPU).

Under an initialised process group (``torchrun``, or ``torch.distributed.init_process_group``), every rank
passes the *same* training set and the same model to :class:`~influencekit.Influence`; rank r of W works on
the contiguous examples ``[r·n/W, (r+1)·n/W)`` (sizes differ by at most one). Nothing else changes:

- every sum over the training data (the mean gradient, Hessian-vector products, the dense Hessian,
  mini-batch products) is computed on the local shard and summed across ranks with ``all_reduce``, so every
  solver that touches the data only through the operator works unchanged and every rank holds the same
  solve (block CG, LiSSA, Arnoldi and exact); K-FAC/EK-FAC stream their own shard through the layer hooks
  and all-reduce the sums behind their Kronecker factors and eigenvalue corrections, so every rank
  eigendecomposes the same factors;
- the query side (test gradients) is computed on every rank and solved together, with sharded HVPs;
- per-example training gradients and their scores are computed on the local shard only, then the score
  blocks and self-influence are gathered on every rank, and top-k lists are merged from each rank's own
  top-k (the full matrix is never gathered).

A failure in a rank's local work (a bad example in its shard) is shared with all ranks before the next
collective, so every rank raises (the failing one its own error, the others a :class:`DistributedError`
naming it) instead of waiting forever; pass ``timeout=`` to ``init_process_group`` to bound the rest.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import DistributedError, InputError, UnsupportedError

__all__ = [
    "Shard",
    "LocalShard",
    "resolve_shard",
    "shard_bounds",
    "init_from_environment",
    "is_main_process",
    "DistributedError",
]

T = TypeVar("T")


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s contiguous shard of ``n`` examples (as ``numpy.array_split``)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class Shard:
    """This process's part of the training set and the collectives the engine needs.

    Attributes:
        rank, world_size: of the process group ``group`` (``None``: the default group).
        n: the size of the whole training set; ``start``/``stop`` bound this rank's shard.
    """

    rank: int
    world_size: int
    n: int
    start: int
    stop: int
    group: Any = None

    @property
    def bounds(self) -> list[tuple[int, int]]:
        return [shard_bounds(self.n, self.world_size, r) for r in range(self.world_size)]

    # -------------------------------------------------------------------------------- collectives
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place, and return it (every rank receives the same values)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def all_gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_columns(self, block: torch.Tensor, widths: list[int] | None = None) -> torch.Tensor:
        """Concatenate every rank's ``(..., width_r)`` block along the last dimension.

        ``widths`` (known to every rank) default to the shard sizes, giving ``(..., n)``.
        """
        widths = [stop - start for start, stop in self.bounds] if widths is None else widths
        padded = torch.zeros(*block.shape[:-1], max(widths), dtype=block.dtype, device=block.device)
        padded[..., : block.shape[-1]] = block
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[..., :w] for p, w in zip(parts, widths)], dim=-1)

    def gather_rows(self, block: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every rank's ``(count_r, ...)`` block along the first dimension (counts known to all)."""
        return self.gather_columns(block.movedim(0, -1), counts).movedim(-1, 0)

    def local(self, work: Callable[[], T]) -> T:
        """Run rank-local work (no collectives inside), then agree with every rank that it succeeded.

        If any rank failed, every rank raises before the next collective: the failing rank re-raises its
        own exception, the others a :class:`DistributedError` naming the first failing rank and its error.
        """
        try:
            result, failure = work(), None
        except Exception as exc:  # re-raised below, once every rank knows
            result, failure, error = None, f"{type(exc).__name__}: {exc}", exc
        failures = self.all_gather_objects(failure)
        if failure is not None:
            raise error
        for rank, message in enumerate(failures):
            if message is not None:
                raise DistributedError(f"rank {rank} of {self.world_size} failed, so every rank stops: {message}")
        return result  # type: ignore[return-value]

    def check_same(self, what: str, fingerprint: dict[str, Any]) -> None:
        """Raise :class:`DistributedError` on every rank unless all ranks pass an equal ``fingerprint``."""
        prints = self.all_gather_objects(fingerprint)
        differ = sorted(
            {key for p in prints for key in set(p) | set(fingerprint) if p.get(key) != fingerprint.get(key)}
        )
        if differ:
            values = "; ".join(
                f"{key}: " + ", ".join(f"rank {r}={p.get(key)!r}" for r, p in enumerate(prints)) for key in differ[:3]
            )
            raise DistributedError(
                f"the ranks of the process group disagree on {what} ({values}). Every rank must build the same "
                "model (same trained parameters), task, training set, solver and options; load one checkpoint "
                "everywhere and pass identical arguments."
            )

    def check_solver(self, solver: Any) -> None:
        """Refuse a solver whose own class does not declare the ``"sharded"`` capability (its result under sharding is
        unknown). A subclass inherits it only by declaring it again: it may have changed the algorithm."""
        if not getattr(type(solver).__dict__.get("capabilities"), "sharded", False):
            raise UnsupportedError(
                f"solver {solver.name!r} is not known to give the same result when the training set is "
                "sharded across processes (it does not declare the 'sharded' capability). Under torch.distributed "
                "use a solver that does (exact, cg, lissa, arnoldi, kfac, ekfac), or pass distributed=False to "
                "compute on every rank alone."
            )

    def first_rank(self, work: Callable[[], Any]) -> None:
        """Run ``work`` (a write to a shared folder) on rank 0 while every rank waits for it and learns whether it
        failed (:meth:`local`), so that the next step finds the same files on every rank."""
        self.local(lambda: work() if self.rank == 0 else None)


@dataclass(frozen=True)
class LocalShard(Shard):
    """The whole training set in this one process: every collective is the identity, every check passes.

    The engine always holds a shard, so no code tests for the absence of a process group.
    """

    rank: int = 0
    world_size: int = 1
    n: int = 0
    start: int = 0
    stop: int = -1  # set from n in __post_init__
    group: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", self.n)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_objects(self, obj: Any) -> list[Any]:
        return [obj]

    def gather_columns(self, block: torch.Tensor, widths: list[int] | None = None) -> torch.Tensor:
        return block if widths is None or widths[0] >= block.shape[-1] else block[..., : widths[0]]

    def local(self, work: Callable[[], T]) -> T:
        return work()

    def check_same(self, what: str, fingerprint: dict[str, Any]) -> None:
        return None

    def check_solver(self, solver: Any) -> None:
        return None


def resolve_shard(distributed: bool | None, n: int, device: torch.device) -> Shard:
    """The :class:`Shard` of this process: a :class:`LocalShard` (the whole training set alone) or its part.

    ``distributed=None`` shards when a process group with more than one rank is initialised; ``True``
    requires one; ``False`` never shards (every rank then computes everything by itself).
    """
    if distributed is False:
        return LocalShard(n=n)
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if distributed:
            raise InputError(
                "`distributed` is True but torch.distributed has no initialised process group. Launch with "
                "torchrun and call torch.distributed.init_process_group('gloo' on CPU, 'nccl' on GPU) before "
                "fit(), or pass distributed=None/False."
            )
        return LocalShard(n=n)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1 and distributed is None:
        return LocalShard(n=n)
    backend = dist.get_backend()
    if backend == "nccl" and device.type != "cuda":
        raise UnsupportedError(
            f"the process group uses the nccl backend, which only moves CUDA tensors, but the model's parameters "
            f"are on {device}. Move the model to this rank's GPU (torch.cuda.set_device(local_rank)) or use the "
            "gloo backend for CPU processes."
        )
    if n < world:
        raise InputError(
            f"the training set must have at least one example per rank to be sharded: {n} examples for "
            f"{world} ranks. Use fewer processes or distributed=False."
        )
    start, stop = shard_bounds(n, world, rank)
    return Shard(rank=rank, world_size=world, n=n, start=start, stop=stop)


# the variables torchrun (torch.distributed.run) sets in every process it starts
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR")


def init_from_environment() -> bool:
    """Initialise the default process group from torchrun's environment, if launched by it; True if it did.

    Nothing happens (False) when ``RANK``, ``WORLD_SIZE`` and ``MASTER_ADDR`` are not all set, or when a group
    is already initialised. The backend is gloo without CUDA; with CUDA it is ``"cpu:gloo,cuda:nccl"`` (nccl
    for GPU tensors, gloo for CPU ones) and this process's GPU is ``LOCAL_RANK``. The caller owns the group
    (``torch.distributed.destroy_process_group()`` when done).
    """
    if not all(os.environ.get(name) for name in TORCHRUN_VARIABLES):
        return False
    if not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    return True


def is_main_process() -> bool:
    """True on rank 0 of an initialised process group, and always without one: the process that writes."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
