"""Each process's share of the data in multi-process (DDP) training, and the data loaders chosen for the device.

In a run of ``W`` processes (``torchrun --nproc_per_node …``), process ``r``:

* caches only its share of the volumes (:func:`cases_to_cache`): every ``W``-th training volume starting at the
  ``r``-th (:func:`round_robin`), its contiguous chunk of the validation volumes (:func:`chunk`; process 0 also keeps
  the others, which the post-hoc calibration is fitted on), and the test volumes only on process 0, which evaluates
  them alone;
* trains on 2D slices of its own training volumes only, so the processes see disjoint slices. PyTorch's
  ``DistributedSampler`` deals indices of one dataset that every process holds; here each process holds a different
  dataset, so :class:`ShardSampler` draws from the process's own slices, shuffled with a seed of (seed, rank,
  epoch), the same number ``ceil(N / W)`` per process (``N`` the training slices of all processes, as
  ``DistributedSampler`` does): DDP needs the same number of batches everywhere. A process with fewer slices repeats
  some of them (drawn from a second permutation), one with more leaves the last of its permutation out (others each
  epoch);
* validates its chunk; the chunks are unpadded (no volume is counted twice) and contiguous, so volumes gathered in
  rank order come back in the split's order.

:func:`slice_loader` picks the loader for the device: MONAI's ``DataLoader`` on CPU (as in a one-process run),
``ThreadDataLoader`` with pinned memory on CUDA (batches are prepared in a background thread while the GPU works).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence

import torch
from monai.data import DataLoader, ThreadDataLoader
from monai.transforms import Compose
from torch.utils.data import Dataset, Sampler

from pipeline.data.loading import EpochStartSampler, SliceDataset


def round_robin(items: Sequence, rank: int, world_size: int) -> list:
    """Every ``world_size``-th item starting at the ``rank``-th (the training volumes of one process).

    >>> round_robin(["a", "b", "c", "d", "e"], 1, 2)
    ['b', 'd']
    """
    check_rank(rank, world_size)
    return list(items)[rank::world_size]


def chunk_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(start, stop)`` of process ``rank``'s contiguous chunk of ``n`` items: the first ``n % world_size`` chunks
    hold one item more (as ``numpy.array_split``); a chunk is empty when ``n < world_size``.

    >>> [chunk_bounds(5, r, 3) for r in range(3)]
    [(0, 2), (2, 4), (4, 5)]
    >>> chunk_bounds(1, 1, 2)
    (1, 1)
    """
    check_rank(rank, world_size)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def chunk(items: Sequence, rank: int, world_size: int) -> list:
    """Process ``rank``'s contiguous chunk of ``items`` (:func:`chunk_bounds`); chunks in rank order are ``items``."""
    start, stop = chunk_bounds(len(items), rank, world_size)
    return list(items)[start:stop]


def check_rank(rank: int, world_size: int) -> None:
    """Raise ``ValueError`` unless ``0 <= rank < world_size``."""
    if not 0 <= int(rank) < int(world_size):
        raise ValueError(f"rank must be in [0, {world_size}) for {world_size} processes, got {rank}")


def cases_to_cache(split: str, cases: list[dict], rank: int, world_size: int) -> list[dict]:
    """The cases of ``split`` that process ``rank`` of ``world_size`` caches (see the module docstring).

    Raises:
        ValueError: fewer training volumes than processes (a process would have nothing to train on).
    """
    check_rank(rank, world_size)
    if world_size == 1:
        return list(cases)
    if split == "train":
        if len(cases) < world_size:
            raise ValueError(f"the training split has {len(cases)} volume(s), fewer than the {world_size} processes: "
                             f"each process trains on volumes of its own; use at most {len(cases)} processes")
        return round_robin(cases, rank, world_size)
    if split == "val":
        return list(cases) if rank == 0 else chunk(cases, rank, world_size)
    return list(cases) if rank == 0 else []


def sample_seed(seed: int, rank: int, epoch: int) -> int:
    """The shuffling seed of one process in one epoch: a stable hash of (seed, rank, epoch)."""
    return zlib.crc32(f"{int(seed)}/{int(rank)}/{int(epoch)}".encode())


class ShardSampler(Sampler[int]):
    """Indices of one process's own ``n_local`` training slices: ``num_samples`` per epoch, shuffled with
    :func:`sample_seed` (seed, rank, epoch); call :meth:`set_epoch` at the start of each epoch.

    Permutations are concatenated until ``num_samples`` indices are drawn, so a process with fewer slices repeats
    some (never within one permutation) and one with more leaves the tail of its permutation out.

    Args:
        n_local: the slices of this process (at least 1).
        num_samples: indices per epoch, the same on every process (``ceil(total slices / processes)``).
        seed: the run's seed.
        rank: this process's rank.

    >>> s = ShardSampler(3, 5, seed=0, rank=0)
    >>> len(list(s)), sorted(set(s))
    (5, [0, 1, 2])
    """

    def __init__(self, n_local: int, num_samples: int, seed: int = 0, rank: int = 0) -> None:
        if n_local < 1:
            raise ValueError(f"process {rank} has no training slice (its volumes give none); use fewer processes "
                             "or keep the empty slices (dataset skip_empty_slices: false)")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        self.n_local, self.num_samples, self.seed, self.rank = int(n_local), int(num_samples), int(seed), int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.rank, self.epoch))
        drawn: list[int] = []
        while len(drawn) < self.num_samples:
            drawn.extend(torch.randperm(self.n_local, generator=g).tolist())
        return iter(drawn[: self.num_samples])


def samples_per_process(slice_counts: Sequence[int]) -> int:
    """``ceil(sum / len)``: the slices each process draws per epoch, so that an epoch is about one pass over all.

    >>> samples_per_process([12, 6])
    9
    """
    return math.ceil(sum(int(n) for n in slice_counts) / len(slice_counts))


def augmentation(augment: Sequence[Callable] | Callable | None, seed: int) -> Compose | None:
    """The random 2D transforms as one ``Compose`` seeded with ``seed`` (``None`` when there are none)."""
    if augment is None:
        return None
    transform = augment if isinstance(augment, Compose) else Compose(list(augment))
    transform.set_random_state(seed=seed)
    return transform


def slice_loader(slices: Dataset, batch_size: int, num_workers: int = 0, seed: int = 0,
                 sampler: Sampler | None = None, device: torch.device | str = "cpu") -> DataLoader:
    """Batches of training slices: shuffled by a generator seeded with ``seed`` (:class:`EpochStartSampler`), or
    drawn by ``sampler``.

    On CUDA a MONAI ``ThreadDataLoader`` (a background thread keeps one batch ready) with pinned memory and
    persistent workers; elsewhere MONAI's ``DataLoader``. MONAI seeds the random transforms from the generator
    (``seed``), so give every process its own.
    """
    generator = torch.Generator().manual_seed(int(seed))
    if sampler is None:
        sampler = EpochStartSampler(slices, generator=generator)
    options = {"batch_size": int(batch_size), "num_workers": int(num_workers), "drop_last": False,
               "generator": generator, "sampler": sampler}
    if torch.device(device).type == "cuda":
        return ThreadDataLoader(slices, buffer_size=1, pin_memory=True, persistent_workers=num_workers > 0,
                                **options)
    return DataLoader(slices, **options)


def local_slices(volumes: Dataset, slice_axis: int, augment, skip_empty: bool, seed: int) -> SliceDataset:
    """The training slices of this process's volumes, with the random 2D transforms seeded by ``seed``."""
    return SliceDataset(volumes, slice_axis, augmentation(augment, seed), skip_empty)


class NoVolumes:
    """An iterable with no volume and no length: the validation data of a process whose chunk is empty.

    Ignite then runs the epoch with no iteration and still completes the metrics, so the process takes part in
    their all-reduce and all-gather (MONAI skips an engine whose loader has length 0, which would leave the others
    waiting).
    """

    def __iter__(self) -> Iterator:
        return iter(())
