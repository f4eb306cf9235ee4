"""Several processes, one run: torch.distributed set up from torchrun's environment.

`torchrun --nproc-per-node N -m sparseft train ...` starts N processes; `init_from_env` joins
them into a process group (nccl when CUDA is available, each process on `cuda:LOCAL_RANK`;
gloo on CPUs). With a group, `sparseft.train.fit`, `sparseft.train.evaluate` and
`sparseft.selection.scores.gradient_scores` are collective: every rank calls them with the same
loader, each works on its share (`shard`) and the results are summed over the ranks. Without a
group every helper here is a no-op and loaders are used as they are.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Sampler

from sparseft.errors import DataWarning, InputError, SparseftError
from sparseft.progress import progress_bar

ShardMode = Literal["batches", "slices", "samples"]


class RankFailed(SparseftError, RuntimeError):
    """Another rank stopped with an error (this rank stops too instead of waiting for it)."""


def progress(batches: Iterable, desc: str, enabled: bool | None = None) -> Any:
    """A progress bar over `batches` on rank 0, iterating them once (`enabled`: see `sparseft.progress`;
    None draws it only on a terminal).

    (`tqdm.auto` given a loader calls `iter` on it twice: a DataLoader's shuffle and worker seeds
    would then come from a second pass that depends on `--workers`.)
    """
    total = len(batches) if hasattr(batches, "__len__") else None
    return progress_bar(iter(batches), desc=desc, total=total, enabled=enabled if is_main() else False, leave=False)


def init_from_env() -> bool:
    """Join the process group torchrun describes (`WORLD_SIZE` > 1); True when this call created it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return True


def shutdown() -> None:
    """Leave the process group (if there is one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes the files (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (no-op for one process)."""
    if active():
        dist.barrier()


def default_device() -> torch.device:
    """The device of this rank's model: `cuda:LOCAL_RANK` under nccl, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    if not active():
        return t
    device = default_device()
    if t.device != device:  # nccl reduces CUDA tensors only
        moved = t.to(device)
        dist.all_reduce(moved, op=op)
        t.copy_(moved)
    else:
        dist.all_reduce(t, op=op)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over the ranks, in place; returns `t` (unchanged for one process)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of `t` over the ranks, in place; returns `t`."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (pickled; for small records such as a selection)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=default_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def run_on_main(fn: Callable[[], Any]) -> Any:
    """Call `fn` on rank 0 only, then let the other ranks past; returns rank 0's result on every rank.

    An error on rank 0 is raised on every rank (as a RuntimeError naming it on the others), so
    no rank waits for one that has stopped.
    """
    if not active():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as err:  # re-raised below, after the others learnt of it
            error = err
    shared = broadcast_object((result, None if error is None else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if shared[1] is not None:
        raise RankFailed(f"rank 0 stopped: {shared[1]}")
    return shared[0]


class _Parts:
    """The rule every shard follows: which part of batch i (of n items) this rank takes.

    mode "batches": whole batches r, r+W, r+2W, ... (selection: the sum over batches is split);
    "slices": a contiguous slice (`tensor_split`'s) of every batch, whose global size is kept in
    `global_sizes` (training: each rank computes part of every step); a batch with fewer items
    than ranks is left out then, with one warning; "samples": items r, r+W, ... of every batch.
    """

    def __init__(self, mode: ShardMode) -> None:
        self.mode, self.rank, self.world = mode, rank(), world_size()
        self.global_sizes: list[int] = []
        self._warned = False

    def part(self, i: int, n: int) -> slice | None:
        if i == 0:
            self.global_sizes = []
            if self.mode == "slices":
                _decorrelate()  # the order is drawn by now: random layers and augmentation differ per rank
        if self.mode == "batches":
            return slice(None) if i % self.world == self.rank else None
        if self.mode == "samples":
            return slice(self.rank, None, self.world)
        if n < self.world:
            if not self._warned and self.rank == 0:  # one warning for the group, not one per rank
                warnings.warn(f"a batch of {n} images for {self.world} processes is left out of every epoch; "
                              "choose --batch-size so the last batch is not smaller than the number of processes",
                              DataWarning, stacklevel=3)
            self._warned = True
            return None
        self.global_sizes.append(n)
        size, extra = divmod(n, self.world)
        start = self.rank * size + min(self.rank, extra)
        return slice(start, start + size + (self.rank < extra))

    def length(self, n: int, last: int | None) -> int:
        """This rank's number of batches out of `n` (`last`: the size of the last one, when known)."""
        if self.mode == "batches":
            return len(range(self.rank, n, self.world))
        return n - int(self.mode == "slices" and last is not None and 0 < last < self.world)


class ShardedBatchSampler(_Parts, Sampler[list[int]]):
    """This rank's part (`_Parts`) of another batch sampler's batches; every rank walks the same order."""

    def __init__(self, batches: Iterable[list[int]], mode: Literal["batches", "slices"]) -> None:
        super().__init__(mode)
        self.batches = batches

    def __len__(self) -> int:
        sampler = getattr(self.batches, "sampler", None)
        size = getattr(self.batches, "batch_size", None)
        last = None
        if sampler is not None and size and not getattr(self.batches, "drop_last", False):
            last = len(sampler) % size  # type: ignore[arg-type]
        return self.length(len(self.batches), last)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.batches):
            part = self.part(i, len(batch))
            if part is not None:
                yield list(batch)[part]


def _decorrelate() -> None:
    """Give this rank's global RNG a stream of its own (the ranks start from the same state)."""
    base = int(torch.randint(0, 2**62, ()).item())
    torch.manual_seed(base + rank())


def _seed_worker(worker_id: int, user_fn: Callable[[int], Any] | None = None) -> None:
    torch.manual_seed((torch.initial_seed() + 1_000_003 * rank()) % 2**64)
    if user_fn is not None:
        user_fn(worker_id)


def shard(loader: Iterable, mode: ShardMode) -> Iterable:
    """This rank's part of `loader` (the loader itself for one process).

    A DataLoader is rebuilt on the same dataset with a `ShardedBatchSampler` ("batches",
    "slices") or the samples r::W of its sampler ("samples": evaluation, no padding), so a rank
    loads only its images. Any other iterable of batches is walked in full by every rank and
    only this rank's part kept.
    """
    if not active():
        return loader
    if isinstance(loader, DataLoader) and loader.batch_sampler is not None:
        if mode == "slices":
            _check_slices(loader)
        if mode == "samples":
            own = list(loader.sampler)[rank()::world_size()]  # type: ignore[arg-type]
            batches: Sampler = BatchSampler(own, loader.batch_size or 1, drop_last=loader.drop_last)
        else:
            batches = ShardedBatchSampler(loader.batch_sampler, mode)
        init = loader.worker_init_fn
        return DataLoader(loader.dataset, batch_sampler=batches, num_workers=loader.num_workers,
                          collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, timeout=loader.timeout,
                          worker_init_fn=functools.partial(_seed_worker, user_fn=init) if loader.num_workers else init,
                          multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                          prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers)
    return _IterableShard(loader, mode)


def _check_slices(loader: DataLoader) -> None:
    """Refuse a loader whose batches cannot be split between the ranks (each rank would skip every
    batch and train on nothing)."""
    try:
        n = len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:
        n = None
    check_global_batch(loader.batch_size, n)


def check_global_batch(batch_size: int | None, images: int | None = None) -> None:
    """Refuse a global batch (or a training split) smaller than the number of processes that share it."""
    world = world_size()
    if batch_size is not None and batch_size < world:
        raise InputError(f"--batch-size {batch_size} is smaller than the number of processes ({world}): the global "
                         f"batch is split between the processes, so it needs at least {world} images; use "
                         f"--batch-size >= {world} or fewer processes")
    if images is not None and images < world:
        raise InputError(f"the training split has {images} image{'s' if images != 1 else ''}, fewer than the "
                         f"{world} processes that share every batch; use fewer processes")


class _IterableShard(_Parts):
    """`shard` for an iterable of `(inputs, labels)` batches that is not a DataLoader (walked in full)."""

    def __init__(self, batches: Iterable, mode: ShardMode) -> None:
        super().__init__(mode)
        self.batches = batches

    def __len__(self) -> int:
        return self.length(len(self.batches), None)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.batches):
            if self.mode == "batches":  # whole batches, as they are (e.g. two views and labels)
                if self.part(i, 0) is not None:
                    yield batch
                continue
            x, y = batch
            part = self.part(i, len(y))
            if part is not None:
                yield x[part], y[part]


def global_sizes(shard_: Iterable) -> list[int]:
    """The global batch sizes of a "slices" shard's current epoch, in order."""
    sampler = getattr(shard_, "batch_sampler", shard_)
    return sampler.global_sizes  # type: ignore[union-attr]
