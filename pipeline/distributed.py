"""Multi-process training on PyTorch's own engine: torch's elastic agent starts the processes, ``ignite.distributed``
joins them in a process group (nccl on GPUs, one device per local rank; gloo on the CPU), ``DistributedDataParallel``
averages the gradients. ``make train NPROC=n`` runs ``python -m pipeline train --nproc n`` (:mod:`pipeline.launch`:
the agent with a rendezvous on the loopback interface); across nodes, ``torchrun --nnodes … --node_rank …
--rdzv_endpoint …`` (README). One process is the plain run: :class:`DistributedRun` then changes nothing. Every
exchange between the processes waits at most the config's ``distributed_timeout`` minutes, so a dead, frozen or
stalled process fails the job instead of hanging it.

What each process does (``run_training`` calls the methods of :class:`DistributedRun`):

* **data**: each caches only its share of the volumes and trains on slices of its own training volumes, the same
  number of batches per process, shuffled per epoch; validation volumes are split into unpadded contiguous chunks
  (:mod:`pipeline.data.sharding`). ``cache: auto`` compares each process's estimate with its share of the node's
  memory (the available memory divided by the processes of the node).
* **seeds**: the weights are drawn with the run's seed in every process and DDP starts from rank 0's; the
  augmentation and dropout of rank ``r`` use ``seed + 100003 r`` (:func:`process_seed`).
* **validation** runs on every process over its chunk; the metrics all-reduce their sums and gather their
  per-volume rows in rank order (so rows come back in the split's order, paired with the gathered volume ids in
  ``evaluator.state.volume_ids``). Before each validation, rank 0's weights and batch-norm statistics are copied to
  every process, so the scores are those of the weights rank 0 saves: equal to a one-process evaluation of the
  checkpoint, per volume and in the means (the means up to float rounding: sums are added in another order).
* **rank 0 only**: the run folder, the MLflow run (other processes get a :class:`NullTracker`), checkpoints (Ignite's
  ``DiskSaver`` writes on rank 0), console output. After the last epoch every process meets at a barrier, the group
  ends, and rank 0 alone fits the post-hoc calibrators and evaluates the test volumes, as a one-process run does
  (exact by construction); the other processes return.
* **logged**: the per-epoch training loss is the mean over processes; the MLflow parameters ``world_size``,
  ``n_train_slices`` (all processes), ``slices_per_process`` and ``ddp_backend``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from torch.nn.parallel import DistributedDataParallel

from pipeline.collectives import barrier, broadcast_state, broadcast_text, gather_in_rank_order, mean_across
from pipeline.data.loading import train_loader, volume_loader
from pipeline.data.sharding import (
    NoVolumes,
    ShardSampler,
    cases_to_cache,
    chunk_bounds,
    local_slices,
    samples_per_process,
    slice_loader,
)

#: the config key: how many minutes a process waits for the others in one collective before its job fails
TIMEOUT_KEY = "distributed_timeout"


def collective_timeout(minutes) -> timedelta:
    """The process group's timeout from the config value ``minutes`` (a positive number).

    Raises:
        ValueError: naming the key and the value, when it is not a positive number.
    """
    try:
        value = float(minutes)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf") or isinstance(minutes, bool):
        raise ValueError(f"{TIMEOUT_KEY} must be a positive number of minutes (e.g. 30), got {minutes!r}")
    return timedelta(minutes=value)


def process_seed(seed: int, rank: int) -> int:
    """The augmentation and dropout seed of rank ``rank``: ``seed + 100003 * rank`` (rank 0 keeps the run's seed)."""
    return int(seed) + 100003 * int(rank)


class NullTracker:
    """The tracker of a process other than rank 0: every method accepts anything and does nothing, and returns the
    tracker itself (so ``tracker.engine_handler().attach(engine)`` attaches nothing); ``run_id`` is ``None``."""

    run_id = None

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self


class DistributedRun:
    """This process's place in a run: rank, number of processes, device; the steps of training that differ between
    processes (see the module docstring). With one process every method returns what a plain run uses.

    Use :meth:`start`; ``rank``, ``world_size``, ``local_rank`` and ``local_world_size`` are then set.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, local_world_size: int = 1,
                 backend: str | None = None) -> None:
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_rank, self.local_world_size = int(local_rank), int(local_world_size)
        self.backend = backend
        self.n_train_slices: int | None = None
        self.slices_per_process: int | None = None
        self.sampler: ShardSampler | None = None

    @classmethod
    def start(cls, device: torch.device | str, timeout_minutes=30) -> DistributedRun:
        """Join the process group of a ``torchrun`` launch (``WORLD_SIZE`` > 1): nccl for a CUDA ``device`` (this
        process then uses GPU ``LOCAL_RANK``), gloo otherwise. Without ``torchrun``, a one-process run.

        ``timeout_minutes`` (the config's ``distributed_timeout``) bounds every wait for the other processes: a
        collective that a dead, frozen or stalled process never joins fails after it, in every process still alive.

        Raises:
            ValueError: ``timeout_minutes`` is not a positive number (checked in one process too).
        """
        timeout = collective_timeout(timeout_minutes)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world < 2 and idist.get_world_size() < 2:
            return cls()
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if idist.get_world_size() < 2:
            idist.initialize("nccl" if cuda else "gloo", timeout=timeout)
        return cls(idist.get_rank(), idist.get_world_size(), idist.get_local_rank(), idist.get_nproc_per_node(),
                   idist.backend())

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        """Rank 0: the process that writes the run folder, the MLflow run and the checkpoints."""
        return self.rank == 0

    def same_text(self, text: str) -> str:
        """Rank 0's ``text`` on every process (the run name: rank 0 generates it)."""
        return broadcast_text(text)

    def rank_zero_first(self, fn) -> None:
        """With several processes: ``fn()`` on rank 0, then on the others (a dataset source that writes its files
        on first use, such as the embedded ``mni``, then writes them once). Nothing in one process."""
        if not self.distributed:
            return
        if not self.is_primary:
            barrier()
        fn()
        if self.is_primary:
            barrier()

    def share(self, split: str, cases: list[dict]) -> list[dict]:
        """The cases of ``split`` this process caches (:func:`pipeline.data.sharding.cases_to_cache`)."""
        return cases_to_cache(split, cases, self.rank, self.world_size)

    def train_loader(self, volumes, slice_axis: int, augment, batch_size: int, num_workers: int, skip_empty: bool,
                     seed: int, device: torch.device):
        """The training batches of this process: a plain run's loader (:func:`pipeline.data.loading.train_loader` on
        the CPU, :func:`pipeline.data.sharding.slice_loader` on CUDA), or with several processes the process's own
        slices drawn by a :class:`pipeline.data.sharding.ShardSampler`.

        Raises:
            ValueError: no training slice, in any process (every process raises it).
        """
        if not self.distributed and torch.device(device).type != "cuda":
            return train_loader(volumes, slice_axis, augment, batch_size, num_workers, skip_empty, seed)
        own = process_seed(seed, self.rank)
        slices = local_slices(volumes, slice_axis, augment, skip_empty, own)
        counts = gather_in_rank_order([len(slices)])
        empty = [r for r, n in enumerate(counts) if n == 0]
        if empty:
            raise ValueError(f"no training slice in process(es) {empty} of {self.world_size}: their training volumes "
                             "give none (every slice skipped?); use fewer processes")
        if not self.distributed:
            return slice_loader(slices, batch_size, num_workers, seed, None, device)
        self.n_train_slices, self.slices_per_process = sum(counts), samples_per_process(counts)
        self.sampler = ShardSampler(len(slices), self.slices_per_process, seed, self.rank)
        return slice_loader(slices, batch_size, num_workers, own, self.sampler, device)

    def validation_loader(self, volumes):
        """This process's validation volumes, one per batch: all of them in one process; else the process's chunk
        (rank 0 caches them all, for the post-hoc calibration; the others cache only their chunk), or
        :class:`pipeline.data.sharding.NoVolumes` for an empty chunk."""
        if not self.distributed:
            return volume_loader(volumes)
        if volumes is None or len(volumes) == 0:
            return NoVolumes()
        if self.is_primary:
            volumes = torch.utils.data.Subset(volumes, range(chunk_bounds(len(volumes), 0, self.world_size)[1]))
        return volume_loader(volumes)

    def wrap(self, network: torch.nn.Module, seed: int, find_unused_parameters: bool = False) -> torch.nn.Module:
        """The network the trainer runs: ``network`` itself in one process, else wrapped in DDP (which starts every
        process from rank 0's weights); also seeds this process's dropout (:func:`process_seed`).

        ``find_unused_parameters`` (the backbone config's flag) is needed by networks with parameters that get no
        gradient in a step (the unused heads of ``unetpp``, the cross-attention norms of ``transunet``).
        """
        if not self.distributed:
            return network
        torch.manual_seed(process_seed(seed, self.rank))
        cuda = next(network.parameters()).device.type == "cuda"
        return DistributedDataParallel(network, device_ids=[self.local_rank] if cuda else None,
                                       find_unused_parameters=bool(find_unused_parameters))

    def attach(self, trainer: Engine, evaluator: Engine | None, network: torch.nn.Module) -> None:
        """Attach what several processes need, before the MLflow handlers: the sampler's epoch, the training loss
        averaged over processes, rank 0's state before each validation, the gathered volume ids, and an evaluator
        that completes its metrics without volumes. Nothing in one process."""
        if not self.distributed:
            return
        if self.sampler is not None:
            trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: self.sampler.set_epoch(e.state.epoch))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, average_training_metrics)
        if evaluator is None:
            return
        evaluator.add_event_handler(Events.STARTED, lambda _: broadcast_state(network))
        VolumeIds().attach(evaluator)
        if isinstance(getattr(evaluator, "data_loader", None), NoVolumes):
            # Ignite stores an epoch length of 0 after the empty epoch; MONAI would then skip the next validation
            evaluator.add_event_handler(Events.COMPLETED, lambda e: setattr(e.state, "epoch_length", None))

    def params(self) -> dict:
        """The MLflow parameters of the run's processes."""
        out = {"world_size": self.world_size}
        if self.distributed:
            out.update(ddp_backend=self.backend, n_train_slices=self.n_train_slices,
                       slices_per_process=self.slices_per_process)
        return out

    def finish_training(self) -> bool:
        """After the last epoch: wait for every process and end the process group. Returns whether this process goes
        on to the post-hoc calibration and the test evaluation (rank 0, alone, as a one-process run)."""
        if not self.distributed:
            return True
        barrier()
        idist.finalize()
        return self.is_primary


def average_training_metrics(trainer: Engine) -> None:
    """Replace the per-process means of the epoch's training loss and its parts (``train/*`` except the learning
    rate) by their mean over processes (each process runs the same number of batches)."""
    m = trainer.state.metrics
    keys = [k for k in m if k.startswith("train/") and k != "train/lr"]
    m.update(mean_across({k: m[k] for k in keys}))


class VolumeIds:
    """Ignite handler: the ids of the volumes an evaluator scored, gathered over processes in rank order, in
    ``engine.state.volume_ids`` at each epoch's end (the order of the gathered per-volume metric rows)."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.record)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.gather)

    def reset(self, engine: Engine) -> None:
        self.ids: list[str] = []

    def record(self, engine: Engine) -> None:
        batch = engine.state.batch
        items = batch if isinstance(batch, list) else [batch]
        for item in items:
            ids = item.get("id", "?")
            self.ids.extend([str(i) for i in ids] if isinstance(ids, (list, tuple)) else [str(ids)])

    def gather(self, engine: Engine) -> None:
        engine.state.volume_ids = gather_in_rank_order(self.ids)
