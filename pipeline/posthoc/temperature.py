"""Temperature scaling (TS; Guo et al., 2017): one temperature for every pixel."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.posthoc.base import Calibrator, check_kind
from pipeline.posthoc.slices import SliceSet


class TemperatureScaling(Calibrator):
    """Temperature scaling around a network: ``forward(x) = network(x) / T`` with one learnt ``T > 0``.

    ``T = exp(log_temperature)`` keeps it positive. The argmax of the output equals the network's.

    Args:
        network: the trained network (its weights are not changed by fitting).
        temperature: the initial temperature (default 1: the identity).

    >>> ts = TemperatureScaling(nn.Identity(), temperature=2.0)
    >>> ts(torch.tensor([[4.0, 2.0]]))
    tensor([[2., 1.]])
    """

    kind = "ts"
    T_MIN, T_MAX = 0.01, 100.0  # a fitted T is clamped to this range (a useless network drives T towards ∞)

    def __init__(self, network: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.network = network
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature), dtype=torch.float32))

    @property
    def temperature(self) -> float:
        return float(self.log_temperature.detach().exp())

    def temperature_map(self, logits: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """The temperature as a ``B×1×spatial`` map (constant)."""
        return self.log_temperature.exp().expand(logits.shape[0], 1, *logits.shape[2:])

    def calibrate(self, logits: torch.Tensor, image: torch.Tensor | None = None, slice_axis: int | None = None
                  ) -> torch.Tensor:
        """Scaled logits ``logits / T`` of any shape ``B×K×spatial`` (``image`` and ``slice_axis`` are ignored)."""
        return logits / self.log_temperature.exp().to(logits.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.calibrate(self.network(x))

    def fit(self, slices: SliceSet, max_iter: int = 50, foreground_only: bool = False) -> dict:
        """Fit ``T`` by minimising the mean NLL of the validation slices over ``log T`` with L-BFGS.

        Args:
            slices: validation logits and labels (:func:`collect_slices`).
            max_iter: L-BFGS iterations (default 50; the NLL is convex in ``1/T``, a few suffice).
            foreground_only: count only ground-truth foreground voxels in the NLL (default: every voxel).

        The fitted ``T`` is clamped to ``[0.01, 100]`` (a network no better than chance drives it towards
        infinity), and reset to 1 if it would not lower the NLL of the fitting set.

        Returns:
            ``{"temperature", "val_nll_before", "val_nll_after", "seconds"}``.

        Raises:
            ValueError: no voxel to fit on, or non-finite logits.
        """
        t0 = time.time()
        device = self.log_temperature.device
        z = torch.cat([b.permute(0, 2, 3, 1).reshape(-1, b.shape[1]) for b in slices.logits]).to(device)
        y = torch.cat([b.reshape(-1) for b in slices.labels]).to(device)
        if foreground_only:
            z, y = z[y != 0], y[y != 0]
        if y.numel() == 0:
            raise ValueError("temperature scaling has no validation voxel to fit on (foreground_only="
                             f"{foreground_only})")
        if not torch.isfinite(z).all():
            raise ValueError("the validation logits contain NaN or infinite values; cannot fit a temperature")
        with torch.no_grad():
            before = float(F.cross_entropy(z, y))
        optim = torch.optim.LBFGS([self.log_temperature], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            optim.zero_grad()
            loss = F.cross_entropy(z * torch.exp(-self.log_temperature), y)
            loss.backward()
            return loss

        optim.step(closure)
        with torch.no_grad():
            self.log_temperature.clamp_(math.log(self.T_MIN), math.log(self.T_MAX))
            after = float(F.cross_entropy(z / self.log_temperature.exp(), y))
            if not math.isfinite(after) or after > before:  # never worse than the identity on the fitting set
                self.log_temperature.zero_()
                after = before
        return {"temperature": self.temperature, "val_nll_before": before, "val_nll_after": after,
                "seconds": time.time() - t0}

    # --- persistence -------------------------------------------------------------------------------------------
    def calibrator_state(self) -> dict:
        return {"kind": self.kind, "temperature": self.temperature}

    def load_calibrator_state(self, state: dict) -> None:
        check_kind(state, self.kind)
        with torch.no_grad():
            self.log_temperature.fill_(math.log(float(state["temperature"])))

    @classmethod
    def _from_state(cls, network: nn.Module, state: dict) -> TemperatureScaling:
        return cls(network, float(state["temperature"]))
