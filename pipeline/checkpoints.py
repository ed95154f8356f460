"""Resumable training: ``checkpoints/last.pt`` holds everything the next epochs depend on, and SIGTERM stops
training cleanly.

``last.pt`` (written by :class:`TrainingCheckpoint` at the end of every ``checkpoint_interval``-th epoch and of the
last one, atomically and flushed to disk) holds the network, optimizer, LR scheduler (and AMP grad scaler) states,
the trainer's epoch and iteration, the best validation metric (its epoch and the best checkpoint's file), the
training time so far, and every random state that shapes the next epochs: torch (CPU and CUDA), NumPy, Python
``random``, the training loader's shuffling generator and the generator of every MONAI ``Randomizable``
augmentation transform; and the loss's own state when it has one (``state_dict()``, e.g. CRaC's multipliers).
Loaded into a freshly built run (same config, same seed), the remaining epochs then give the same weights,
bit for bit on a CPU with the same thread count, as an uninterrupted run.

With several processes each rank's own random states are kept (rank ``r`` draws its own augmentation and dropout),
and each rank gets its own back.

A checkpoint is never written from weights that are NaN or infinite (:class:`pipeline.engines.NonFiniteLossError`
is raised instead), and nothing is written when training stops on an error: ``last.pt`` is always the last good
epoch.

A kill at any instant leaves a resumable folder: ``last.pt`` and the best-weights files (:class:`BestWeights`) are
written atomically, and a best-weights file that ``last.pt`` names is kept until a newer ``last.pt`` names another
(:meth:`TrainingCheckpoint.tidy` then removes it, with the temporary files of writes that a kill interrupted).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.transforms import Randomizable

from pipeline.collectives import gather_values, rank, world_size
from pipeline.engines import NonFiniteLossError
from pipeline.io import atomic_path

log = logging.getLogger("pipeline")

LAST = "last.pt"
FORMAT = 1
#: the name prefix of the best-weights files and of the temporary files of atomic writes (:func:`atomic_path`)
BEST_PREFIX, TEMPORARY_PREFIX = "best_", ".tmp-"


class TrainingTerminated(KeyboardInterrupt):
    """Training was stopped by SIGTERM (what batch schedulers send before a preemption or a time limit).

    A ``KeyboardInterrupt``: no ``except Exception`` swallows it, and :class:`pipeline.tracking.RunTracker` marks the
    run KILLED.
    """


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`TrainingTerminated` in the main thread (the first one only; later
    ones are noted and ignored while the run is closed). An error raised after a SIGTERM (e.g. by a data-loader
    worker killed by the same signal) comes out as :class:`TrainingTerminated` too. Elsewhere than in the main
    thread the block runs unchanged (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def handler(signum, _frame):
        received.append(signum)
        if len(received) == 1:
            raise TrainingTerminated(f"stopped by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except TrainingTerminated:
        raise
    except BaseException as e:
        if received:
            raise TrainingTerminated(f"stopped by {signal.Signals(received[0]).name} ({e})") from e
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def random_transforms(root: Any) -> dict[str, Randomizable]:
    """Every MONAI ``Randomizable`` inside ``root`` (a transform, a ``Compose``, a list or dict of them; nested
    transforms such as ``RandAffined.rand_affine`` included), by attribute path (``transforms.1.rand_affine``)."""
    found: dict[str, Randomizable] = {}
    seen: set[int] = set()

    def visit(obj: Any, path: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            found[path or "."] = obj
        if isinstance(obj, (list, tuple)):
            children = enumerate(obj)
        elif isinstance(obj, Mapping):
            children = obj.items()
        elif type(obj).__module__.startswith("monai.transforms") or isinstance(obj, Randomizable):
            children = vars(obj).items()
        else:
            return
        for k, v in children:
            if isinstance(v, (list, tuple, Mapping)) or type(v).__module__.startswith("monai.transforms"):
                visit(v, f"{path}.{k}" if path else str(k))

    visit(root, "")
    return found


def _numpy_state(state: tuple) -> dict:
    name, key, pos, has_gauss, gauss = state
    return {"name": name, "key": torch.from_numpy(np.asarray(key, dtype=np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _numpy_tuple(state: Mapping) -> tuple:
    return (state["name"], state["key"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["gauss"])


def rng_states(generator: torch.Generator | None = None, transforms: Any = None) -> dict:
    """The random states of torch (CPU, CUDA), NumPy, Python ``random``, ``generator`` and of every transform of
    :func:`random_transforms` in ``transforms``, as tensors and plain values (loadable with ``weights_only``)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": _numpy_state(np.random.get_state()),
        "python": random.getstate(),
        "generator": None if generator is None else generator.get_state(),
        "transforms": {p: _numpy_state(t.R.get_state()) for p, t in random_transforms(transforms).items()},
    }


def set_rng_states(states: Mapping, generator: torch.Generator | None = None, transforms: Any = None) -> None:
    """Restore what :func:`rng_states` returned.

    Raises:
        ValueError: the augmentation transforms are not those the states were taken from.
    """
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    np.random.set_state(_numpy_tuple(states["numpy"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if generator is not None and states["generator"] is not None:
        generator.set_state(states["generator"])
    found = random_transforms(transforms)
    if set(found) != set(states["transforms"]):
        raise ValueError(f"the checkpoint holds the random states of the augmentation transforms "
                         f"{sorted(states['transforms'])}, this run has {sorted(found)}")
    for p, t in found.items():
        t.R.set_state(_numpy_tuple(states["transforms"][p]))


def save_durably(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` atomically (:func:`pipeline.io.atomic_path`), the file and its folder flushed to
    disk before returning (a power cut or a node failure right after cannot lose it)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


class _KeepReplaced(BaseSaveHandler):
    """Ignite save handler of :class:`BestWeights`: rank 0 writes each file with :func:`save_durably`; the file a
    better one replaces is left in place (:meth:`TrainingCheckpoint.tidy` removes it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        if rank() == 0:
            save_durably(checkpoint, self.folder / filename)

    def remove(self, filename: str) -> None:
        pass


class BestWeights:
    """The best validation weights, ``checkpoints/best_network_key_metric=<DSC>.pt``: Ignite's ``Checkpoint`` on
    the evaluator's epoch end, keeping the file of the highest ``metric`` (a bare state dict, under the name MONAI's
    ``CheckpointSaver`` gives it).

    Two differences from a plain saver make a kill at any instant harmless: a file is written atomically and
    flushed (a kill during the write leaves the previous one whole), and the file a better one replaces stays until
    a newer ``last.pt`` names its successor (the ``last.pt`` on disk may still name it: a run killed before its next
    ``last.pt`` continues from there and needs it).

    Args:
        folder: the run's ``checkpoints/`` folder.
        network: the network whose weights are saved.
        metric: the evaluator's key metric (higher is better).
    """

    def __init__(self, folder: str | os.PathLike, network: torch.nn.Module, metric: str = "val/dsc") -> None:
        self.folder = Path(folder)
        self.checkpoint = Checkpoint({"network": network}, _KeepReplaced(self.folder), filename_prefix="best",
                                     score_function=lambda engine: float(engine.state.metrics[metric]),
                                     score_name="key_metric", n_saved=1)

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.EPOCH_COMPLETED, self.checkpoint)

    @property
    def path(self) -> Path | None:
        """The file of the best weights so far (``None`` before the first validation)."""
        last = self.checkpoint.last_checkpoint
        return None if last is None else self.folder / Path(last).name


class TrainingCheckpoint:
    """Ignite handler writing the resumable state (``last.pt``) at the end of every ``interval``-th epoch and of the
    last one; :meth:`load` puts such a state back into a freshly built run.

    Attach it after every other ``EPOCH_COMPLETED`` handler of the trainer (LR step, validation, logging), so that it
    saves the epoch as finished.

    Args:
        path: the checkpoint file (``<run>/checkpoints/last.pt``).
        network, optimizer: the trained network and its optimizer.
        scheduler: the LR scheduler (``None`` for none).
        evaluator: the validation engine (its best metric and best epoch are kept).
        best_saver: the :class:`BestWeights` on the evaluator (its record of the best file is kept).
        generator: the training loader's shuffling generator.
        transforms: the augmentation transforms (e.g. the training ``SliceDataset.transform``).
        interval: write every ``interval`` epochs (default 1); the last epoch is always written.
        loss: the training loss; its ``state_dict()`` (empty for a loss without state) is kept and restored.

    With several processes attach it in every process: each one's random states are gathered, rank 0 writes.
    """

    def __init__(self, path: str | os.PathLike, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler=None, evaluator: Engine | None = None, best_saver: BestWeights | None = None,
                 generator: torch.Generator | None = None, transforms: Any = None, interval: int = 1,
                 loss: torch.nn.Module | None = None) -> None:
        if int(interval) < 1:
            raise ValueError(f"checkpoint_interval must be a whole number >= 1, got {interval}")
        self.path = Path(path)
        self.network, self.optimizer, self.scheduler = network, optimizer, scheduler
        self.evaluator, self.best_saver = evaluator, best_saver
        self.generator, self.transforms = generator, transforms
        self.interval = int(interval)
        self.warning: str | None = None  # set by load when the random states cannot all be restored
        self.loss = loss
        self.seconds_before = 0.0  # training time of the earlier processes of a resumed run
        self._t0: float | None = None

    def attach(self, trainer: Engine) -> None:
        trainer.add_event_handler(Events.STARTED, self._started)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _started(self, _trainer: Engine) -> None:
        self._t0 = time.monotonic()

    def train_seconds(self) -> float:
        """Training time so far, the earlier processes of a resumed run included."""
        return self.seconds_before + (0.0 if self._t0 is None else time.monotonic() - self._t0)

    def __call__(self, trainer: Engine) -> None:
        epoch = trainer.state.epoch
        if epoch % self.interval == 0 or epoch == trainer.state.max_epochs:
            self.save(trainer)

    def _best_record(self) -> Checkpoint | None:
        return None if self.best_saver is None else self.best_saver.checkpoint

    def state_dict(self, trainer: Engine) -> dict:
        """The state to write; with several processes every process must call it (their random states are
        gathered)."""
        ranks = gather_values(rng_states(self.generator, self.transforms))
        best = self._best_record()
        ev = None if self.evaluator is None else self.evaluator.state
        return {
            "format": FORMAT,
            "epoch": int(trainer.state.epoch), "iteration": int(trainer.state.iteration),
            "max_epochs": int(trainer.state.max_epochs), "epoch_length": int(trainer.state.epoch_length),
            "network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if getattr(trainer, "scaler", None) is None else trainer.scaler.state_dict(),
            "best": {"metric": None if ev is None else float(ev.best_metric),
                     "epoch": None if ev is None else int(ev.best_metric_epoch),
                     "saver": None if best is None else dict(best.state_dict()),
                     "checkpoint": None if self.best_saver is None or self.best_saver.path is None
                     else str(self.best_saver.path)},
            "train_seconds": self.train_seconds(),
            "rng": ranks[0],
            "rng_ranks": ranks,  # rank r's states at r (rank 0's alone in a one-process run)
            "loss": {} if self.loss is None else self.loss.state_dict(),
        }

    def save(self, trainer: Engine) -> Path:
        """Write the state after ``trainer``'s current epoch (rank 0 writes, every process must call it), then
        :meth:`tidy` the folder.

        Raises:
            NonFiniteLossError: the weights hold NaN or infinite values (the previous ``last.pt`` is kept).
        """
        bad = [name for name, p in self.network.state_dict().items()
               if p.is_floating_point() and not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(
                f"the network's weights hold NaN or infinite values after epoch {trainer.state.epoch} ({bad[0]}"
                f"{' and others' if len(bad) > 1 else ''}); training stopped, the last good checkpoint {self.path} "
                "is kept. Lower the learning rate, or check the data.")
        state = self.state_dict(trainer)
        if rank() == 0:
            save_durably(state, self.path)
            self.tidy()
        return self.path

    def tidy(self) -> list[Path]:
        """Remove from the checkpoint folder what ``last.pt`` does not need: the best-weights files other than the
        one of the best record (a better file written after the last ``last.pt`` of a killed run, or the file a
        newer best replaced) and the temporary files of writes a kill interrupted. Returns what was removed.

        Call it in the one process that writes, after loading (or without) ``last.pt``: the record then matches it.
        """
        keep = None if self.best_saver is None else self.best_saver.path
        folder = self.path.parent
        if not folder.is_dir():
            return []
        stale = [p for p in folder.iterdir() if p.is_file() and (
            p.name.startswith(TEMPORARY_PREFIX) or (p.name.startswith(BEST_PREFIX) and p.suffix == ".pt"
                                                     and p != keep))]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            log.info("removed from %s: %s", folder, ", ".join(sorted(p.name for p in stale)))
        return stale

    def load(self, trainer: Engine, path: str | os.PathLike | None = None) -> dict:
        """Put the state of ``path`` (default :attr:`path`) into the run: weights, optimizer, scheduler, the
        trainer's epoch, the best metric and its file, the random states. Returns the checkpoint's dict.

        Raises:
            ValueError: a checkpoint of another format or of another run length (``epochs``).
            FileNotFoundError: the best-weights file it names is missing (removed by hand?).
        """
        path = Path(path or self.path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{path} is not a resumable checkpoint of this version (written before resuming was "
                             "possible?): start a new run")
        if state["max_epochs"] != trainer.state.max_epochs:
            raise ValueError(f"{path} belongs to a run of {state['max_epochs']} epochs, this one has "
                             f"{trainer.state.max_epochs}")
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if getattr(trainer, "scaler", None) is not None and state.get("scaler") is not None:
            trainer.scaler.load_state_dict(state["scaler"])  # the AMP loss scale of a GPU run
        trainer.load_state_dict({"epoch": state["epoch"], "max_epochs": state["max_epochs"],
                                 "epoch_length": state["epoch_length"]})
        best = state["best"]
        if self.evaluator is not None and best["metric"] is not None:
            self.evaluator.state.best_metric = best["metric"]
            self.evaluator.state.best_metric_epoch = best["epoch"]
        record = self._best_record()
        if record is not None and best["saver"] is not None:
            record.load_state_dict(best["saver"])
        if self.loss is not None and state.get("loss"):
            self.loss.load_state_dict(state["loss"])
        self.seconds_before = float(state.get("train_seconds", 0.0))
        ranks = state.get("rng_ranks") or [state["rng"]]
        if len(ranks) != world_size():
            self.warning = (f"{path} was written by {len(ranks)} process(es), this run has {world_size()}: the random "
                            "states of augmentation and shuffling are not those of an uninterrupted run, so the "
                            "continued run is not bit for bit the same")
            log.warning(self.warning)
        set_rng_states(ranks[rank()] if rank() < len(ranks) else ranks[0], self.generator, self.transforms)
        best_file = None if self.best_saver is None else self.best_saver.path
        if rank() == 0 and best_file is not None and not best_file.is_file():
            raise FileNotFoundError(f"{path} names the best weights {best_file}, which are missing: the "
                                    "run cannot continue as it was; start a new run")
        return state
