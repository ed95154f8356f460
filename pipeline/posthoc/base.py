"""What every post-hoc calibrator shares: persistence of its fitted state, and slice-wise application to volumes."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from pipeline.io import save_torch_atomic


class Calibrator(nn.Module):
    """Persistence shared by the post-hoc calibrators: a calibrator's fitted state is a small dict with its
    ``kind``; subclasses define :meth:`calibrator_state`, :meth:`load_calibrator_state` and :meth:`_from_state`."""

    kind = ""

    def calibrator_state(self) -> dict:  # pragma: no cover - defined by every subclass
        raise NotImplementedError

    def save_calibrator(self, path: str | os.PathLike) -> Path:
        """Write the fitted state to ``path`` (atomically: an existing file is replaced only once complete)."""
        return save_torch_atomic(self.calibrator_state(), path)

    @classmethod
    def load_calibrator(cls, network: nn.Module, path: str | os.PathLike):
        """A calibrator around ``network`` with the state saved at ``path`` (its kind must be this class's)."""
        state = load_state(path)
        check_kind(state, cls.kind, path)
        return cls._from_state(network, state)

    @classmethod
    def _from_state(cls, network: nn.Module, state: dict):  # pragma: no cover - defined by every subclass
        raise NotImplementedError


def load_state(path: str | os.PathLike) -> dict:
    """Read a calibrator file (``weights_only``); a missing or unreadable file raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no calibrator file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path} is not a readable calibrator file ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "kind" not in state:
        raise ValueError(f"{path} is not a calibrator file (expected a dict with a 'kind' entry)")
    return state


def check_kind(state: dict, kind: str, path=None) -> None:
    """Raise unless ``state`` is the state of a ``kind`` calibrator."""
    if state.get("kind") != kind:
        where = f" in {path}" if path else ""
        raise ValueError(f"expected a '{kind}' calibrator{where}, got '{state.get('kind')}'")


def slicewise(fn, volume: torch.Tensor, image: torch.Tensor | None, slice_axis: int) -> torch.Tensor:
    """Apply ``fn(slices, image_slices)`` to the 2D slices of ``B×K×X×Y×Z`` (and ``B×C×X×Y×Z``) along an axis."""
    axis = slice_axis + 2
    b, n = volume.shape[0], volume.shape[axis]
    z = volume.movedim(axis, 1).reshape(b * n, volume.shape[1], *volume.movedim(axis, 1).shape[3:])
    x = None
    if image is not None:
        xm = image.movedim(axis, 1)
        x = xm.reshape(b * n, image.shape[1], *xm.shape[3:])
    out = fn(z, x)
    return out.reshape(b, n, *out.shape[1:]).movedim(1, axis)
