"""Evaluation over several processes (``torchrun``), shared by the evaluation scripts.

A script opens a :func:`session` and gets a :class:`Context`: one process (nothing to set up) or,
under ``torchrun --nproc_per_node N`` (or any launcher that sets ``RANK``/``WORLD_SIZE`` and
``MASTER_ADDR``/``MASTER_PORT``), one rank of a process group: NCCL when the device is CUDA (each
rank on ``cuda:LOCAL_RANK``), gloo otherwise. Each rank evaluates the disjoint shard
:func:`shard_indices` gives it; counts and per-item results are gathered to rank 0, which alone
prints and writes. Work a rank does on its own (loading, evaluating its shard) runs inside
:meth:`Context.step`, so that an error on one rank stops every rank with that rank's message
instead of leaving the others waiting in the next collective.

The merging of gathered pieces is pure (:func:`merge_rows`, :func:`add_counts`) and checks that
every item was evaluated exactly once.
"""
import contextlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["Context", "RankFailed", "session", "shard_indices", "shard", "merge_rows", "add_counts",
           "run_script", "rank_lines"]


class RankFailed(RuntimeError):
    """Raised on every rank when a step failed on some rank; the message names the rank and its error."""


@dataclass(frozen=True)
class Context:
    """Where this process stands: its ``rank`` of ``world_size``, its ``device`` and the process
    group's ``backend`` (None for a single process)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, reports progress and writes results."""
        return self.rank == 0

    def gather(self, obj: Any) -> Optional[List[Any]]:
        """Every rank's ``obj`` (picklable) as a list by rank on rank 0; None on the others."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Run a block that has no collective inside on every rank; when it raises on any rank,
        every rank raises (the failed one its own error, the others :class:`RankFailed` naming
        it), so no rank is left waiting for one that has gone."""
        if self.world_size == 1:
            yield
            return
        error: Optional[BaseException] = None
        try:
            yield
        except (Exception, SystemExit) as err:  # reported to the other ranks below, then re-raised
            error = err
        messages: List[Optional[str]] = [None] * self.world_size
        dist.all_gather_object(messages, None if error is None else _describe(error))
        if error is not None:
            raise error
        failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
        if failed:
            rank, message = failed[0]
            raise RankFailed(f"rank {rank} of {self.world_size} failed while {what}: {message}")


def _describe(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return str(error.code)
    return f"{type(error).__name__}: {error}"


def _context_from_environment(device: str) -> Context:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Context(device=torch.device(device))
    if "RANK" not in os.environ:
        raise RuntimeError(f"WORLD_SIZE={world_size} is set but RANK is not: launch with torchrun "
                           "(or set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process)")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA "
                                   "device(s): start at most that many processes per node (--nproc_per_node)")
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Context(rank=rank, world_size=world_size, device=dev, backend=backend)


@contextlib.contextmanager
def session(device: str) -> Iterator[Context]:
    """The :class:`Context` of this process for ``device`` ("cuda", "cuda:1", "cpu"), with the
    process group set up from the launcher's environment and torn down on the way out."""
    ctx = _context_from_environment(device)
    try:
        yield ctx
    finally:
        if ctx.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def shard_indices(length: int, rank: int, world_size: int) -> range:
    """The items of rank ``rank``: every ``world_size``-th from ``rank``. Shards are disjoint,
    cover all ``length`` items (no padding, no duplicates) and differ in size by at most one;
    the stride spreads a class-sorted folder evenly over the ranks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard_indices: rank {rank} of world size {world_size}; need 0 <= rank < world_size")
    return range(rank, length, world_size)


def shard(dataset: torch.utils.data.Dataset, ctx: Context) -> torch.utils.data.Dataset:
    """This rank's part of ``dataset`` (the dataset itself for a single process)."""
    if ctx.world_size == 1:
        return dataset
    if len(dataset) < ctx.world_size:
        raise ValueError(f"{len(dataset)} items cannot be shared by {ctx.world_size} ranks (one would get none): "
                         f"start at most {len(dataset)} processes")
    return torch.utils.data.Subset(dataset, shard_indices(len(dataset), ctx.rank, ctx.world_size))


def merge_rows(parts: Sequence[Tuple[torch.Tensor, torch.Tensor]], length: int) -> torch.Tensor:
    """``[length, ...]`` rows in dataset order from ``(index [n], rows [n, ...])`` pieces (one per
    rank); every index in ``0..length-1`` must come exactly once."""
    index = torch.cat([torch.as_tensor(i, dtype=torch.long) for i, _ in parts])
    rows = torch.cat([r for _, r in parts])
    if index.numel() != rows.shape[0]:
        raise ValueError(f"merge_rows: {index.numel()} indices for {rows.shape[0]} rows")
    if index.numel() and (index.min() < 0 or index.max() >= length):
        raise ValueError(f"merge_rows: indices outside 0..{length - 1}")
    seen = torch.bincount(index, minlength=length)
    if not (seen == 1).all():
        missing, twice = int((seen == 0).sum()), int((seen > 1).sum())
        raise ValueError(f"merge_rows: {missing} of {length} items missing and {twice} seen more than once; "
                         "the shards must partition the dataset (shard_indices)")
    out = rows.new_empty((length,) + tuple(rows.shape[1:]))
    out[index] = rows
    return out


def add_counts(parts: Sequence[Dict[str, int]]) -> Dict[str, int]:
    """Key-wise sum of per-rank counts (all ranks must report the same keys)."""
    keys = set(parts[0])
    if any(set(p) != keys for p in parts):
        raise ValueError(f"add_counts: ranks report different counts: {[sorted(p) for p in parts]}")
    return {k: sum(p[k] for p in parts) for k in parts[0]}


def gather_rows(rows: torch.Tensor, index: torch.Tensor, length: int, ctx: Context) -> Optional[torch.Tensor]:
    """All ranks' ``rows`` (those of dataset items ``index``) in dataset order on rank 0; None elsewhere."""
    parts = ctx.gather((torch.as_tensor(index).cpu(), rows.detach().cpu()))
    return None if parts is None else merge_rows(parts, length)


def sum_counts(counts: Dict[str, int], ctx: Context) -> Optional[Dict[str, int]]:
    """The counts summed over ranks on rank 0; None elsewhere."""
    parts = ctx.gather(counts)
    return None if parts is None else add_counts(parts)


def run_script(evaluate, args, format_table) -> Optional[List[Dict[str, Any]]]:
    """An evaluation script's body: ``evaluate(args, ctx)`` in a :func:`session` on ``args.device``,
    then on rank 0 the table ``format_table(rows)`` printed and the rows written to ``args.json`` (a
    JSON list) if given. The rows on rank 0, None on the others; another rank's failure exits with
    that rank's message."""
    try:
        with session(args.device) as ctx:
            rows = evaluate(args, ctx)
    except RankFailed as err:  # the message names the rank and its error
        sys.exit(str(err))
    if rows is not None:
        print(format_table(rows))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(rows, f, indent=2)
    return rows


def rank_lines(rows: List[Dict[str, Any]]) -> List[str]:
    """Lines under a table run on several ranks: how the images were split and each rank's img/s."""
    per_rank = rows[0]["images_per_rank"]
    if len(per_rank) <= 1:
        return []
    return ([f"{rows[0]['images']} images on {len(per_rank)} ranks ({' + '.join(map(str, per_rank))}); "
             "img/s is the sum over the ranks, per rank:"]
            + [f"  {r['model']}: {', '.join(f'{v:.1f}' for v in r['images_per_s_per_rank'])}" for r in rows])
