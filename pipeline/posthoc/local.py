"""Local temperature scaling (LTS; Ding et al., 2021): one temperature per pixel from a small network."""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.posthoc.base import Calibrator, check_kind, slicewise
from pipeline.posthoc.slices import SliceSet, summed_nll
from pipeline.tensors import check_slice_axis

LTS_EPS = 1e-8


class PadConv(nn.Module):
    """A dilated 2D convolution that keeps the size, padding with ``reflect`` (``replicate`` where the input is too
    small to reflect)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.pad = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad
        mode = "reflect" if min(x.shape[-2:]) > p else "replicate"
        return self.conv(F.pad(x, (p, p, p, p), mode=mode))


class TemperatureNet(nn.Module):
    """Per-pixel temperature from logits and, optionally, the image: a two-level gated tree of 9 dilated
    convolutions (after Ding et al., 2021).

    Layout (every convolution ``kernel_size``×``kernel_size`` with dilation ``dilation`` and size-preserving
    reflect padding):

    * features (2 convolutions): ``h_z = relu(conv(logits))``; ``h_x = relu(conv(image))`` when
      ``image_channels > 0``, else ``relu(conv(logits))`` (a second view of the logits);
    * leaves (4): two 1-channel convolutions of ``h_z`` (``a1, a2``) and two of ``h_x`` (``b1, b2``);
    * level 1 (2 gates): ``u_z = g_z a1 + (1 − g_z) a2`` and ``u_x = g_x b1 + (1 − g_x) b2`` with
      ``g_z = sigmoid(conv(h_z))``, ``g_x = sigmoid(conv(h_x))``;
    * level 2 (1 gate): ``x = g u_z + (1 − g) u_x`` with ``g = sigmoid(conv([h_z, h_x]))``;
    * temperature ``T = relu(x + 1) + 1e-8``.

    The convolutions reading the same input are computed as one multi-channel convolution (the same function,
    fewer passes over the data): ``heads_z`` holds ``a1, a2, g_z`` and ``heads_x`` holds ``b1, b2, g_x``.

    Initialisation: the leaves are zero, so ``x = 0`` and ``T = relu(0 + 1) + 1e-8 = 1`` everywhere: the
    identity, whatever the gates say. (A temperature of 2 everywhere would need ``x = 1``.) :meth:`init_constant`
    sets the leaves' biases so that ``T`` starts at any constant, e.g. the TS temperature.

    Args:
        num_classes: ``K``, the logit channels.
        image_channels: ``C``, the image channels fed to the second branch (0: logits only).
        hidden: feature channels of each branch (default 8).
        kernel_size: default 5. dilation: default 2.
    """

    LEAVES = (0, 1)  # channels of heads_z / heads_x that are leaves; channel 2 is the gate

    def __init__(
        self, num_classes: int, image_channels: int = 0, hidden: int = 8, kernel_size: int = 5, dilation: int = 2
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if image_channels < 0 or hidden < 1:
            raise ValueError(f"need image_channels >= 0 and hidden >= 1, got {image_channels}, {hidden}")
        self.config = {"num_classes": int(num_classes), "image_channels": int(image_channels), "hidden": int(hidden),
                       "kernel_size": int(kernel_size), "dilation": int(dilation)}

        def conv(i: int, o: int) -> PadConv:
            return PadConv(i, o, kernel_size, dilation)

        self.feat_z = conv(num_classes, hidden)
        self.feat_x = conv(image_channels or num_classes, hidden)
        self.heads_z = conv(hidden, 3)
        self.heads_x = conv(hidden, 3)
        self.gate_root = conv(2 * hidden, 1)
        self.init_constant(1.0)

    def init_constant(self, temperature: float = 1.0) -> None:
        """Zero the leaves and set their bias so that ``T = temperature`` everywhere (``temperature > 0``)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        with torch.no_grad():
            for heads in (self.heads_z, self.heads_x):
                heads.conv.weight[list(self.LEAVES)] = 0.0
                heads.conv.bias[list(self.LEAVES)] = float(temperature) - 1.0

    def forward(self, logits: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """``B×K×H×W`` logits (and ``B×C×H×W`` image) → ``B×1×H×W`` temperatures."""
        if logits.ndim != 4 or logits.shape[1] != self.config["num_classes"]:
            raise ValueError(f"expected logits B×{self.config['num_classes']}×H×W, got shape {tuple(logits.shape)}")
        if self.config["image_channels"]:
            if (image is None or image.ndim != 4 or image.shape[1] != self.config["image_channels"]
                    or image.shape[2:] != logits.shape[2:] or image.shape[0] != logits.shape[0]):
                got = None if image is None else tuple(image.shape)
                raise ValueError(f"this temperature network takes an image {logits.shape[0]}×"
                                 f"{self.config['image_channels']}×{tuple(logits.shape[2:])}, got {got}")
            second = image
        else:
            second = logits
        h_z = F.relu(self.feat_z(logits))
        h_x = F.relu(self.feat_x(second.to(logits.dtype)))
        a1, a2, g_z = self.heads_z(h_z).unbind(1)
        b1, b2, g_x = self.heads_x(h_x).unbind(1)
        g_z, g_x = torch.sigmoid(g_z), torch.sigmoid(g_x)
        u_z, u_x = g_z * a1 + (1 - g_z) * a2, g_x * b1 + (1 - g_x) * b2
        g = torch.sigmoid(self.gate_root(torch.cat([h_z, h_x], 1)))[:, 0]
        x = g * u_z + (1 - g) * u_x
        return (F.relu(x + 1.0) + LTS_EPS)[:, None]


class LocalTemperatureScaling(Calibrator):
    """Local temperature scaling around a 2D network: ``forward(x) = logits / T(logits, x)``, ``T`` per pixel.

    Args:
        network: the trained 2D network ``B×C×H×W → B×K×H×W`` (its weights are not changed by fitting).
        temperature_net: a :class:`TemperatureNet`.
    """

    kind = "lts"

    def __init__(self, network: nn.Module, temperature_net: TemperatureNet) -> None:
        super().__init__()
        self.network = network
        self.temperature_net = temperature_net

    def temperature_map(self, logits: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """``B×1×H×W`` temperatures; 3D inputs ``B×K×X×Y×Z`` are not accepted here (see :meth:`calibrate`)."""
        return self.temperature_net(logits, image if self.temperature_net.config["image_channels"] else None)

    def calibrate(self, logits: torch.Tensor, image: torch.Tensor | None = None, slice_axis: int | None = None
                  ) -> torch.Tensor:
        """Calibrated logits of ``B×K×H×W`` slices, or of ``B×K×X×Y×Z`` volumes slice by slice along
        ``slice_axis`` (a spatial axis, 0-2, required for volumes)."""
        if logits.ndim == 5:
            check_slice_axis(slice_axis)
            return slicewise(lambda z, x: self.calibrate(z, x), logits, image, slice_axis)
        return logits / self.temperature_map(logits, image).to(logits.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.calibrate(self.network(x), x)

    def fit(
        self,
        slices: SliceSet,
        iterations: int = 200,
        lr: float = 1e-3,
        batch_slices: int = 16,
        eval_every: int = 10,
        foreground_only: bool = False,
        seed: int = 0,
    ) -> dict:
        """Fit the temperature network by NLL with Adam on validation slices; keep the state of lowest NLL.

        The fitting budget is ``iterations`` Adam steps on mini-batches of up to ``batch_slices`` slices of one
        volume; every ``eval_every`` steps (and before the first) the mean NLL over all slices is measured and the
        best state so far kept, so the result is never worse on the validation slices than the starting state.

        Returns:
            ``{"val_nll_before", "val_nll_after", "best_iteration", "iterations", "seconds"}``.

        Raises:
            ValueError: bad budget values, or no voxel to fit on.
        """
        if iterations < 0 or batch_slices < 1 or eval_every < 1:
            raise ValueError(f"need iterations >= 0, batch_slices >= 1 and eval_every >= 1, got {iterations}, "
                             f"{batch_slices}, {eval_every}")
        t0 = time.time()
        device = next(self.temperature_net.parameters()).device
        data = slices.to(device)
        if (data.n_voxels if not foreground_only else sum(int((y != 0).sum()) for y in data.labels)) == 0:
            raise ValueError(f"local temperature scaling has no validation voxel to fit on (foreground_only="
                             f"{foreground_only})")
        net = self.temperature_net
        use_image = net.config["image_channels"] > 0

        def fullsummed_nll() -> float:
            total, count = 0.0, 0
            with torch.no_grad():
                for z, x, y in zip(data.logits, data.images, data.labels):
                    for k in range(0, len(z), batch_slices):
                        s, n = summed_nll(z[k : k + batch_slices] / net(z[k : k + batch_slices],
                                                                   x[k : k + batch_slices] if use_image else None),
                                    y[k : k + batch_slices], foreground_only)
                        total, count = total + float(s), count + n
            return total / max(count, 1)

        was_training = net.training
        net.train()
        best_nll = before = fullsummed_nll()
        best_state, best_it = copy.deepcopy(net.state_dict()), 0
        optim = torch.optim.Adam(net.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        sizes = torch.tensor([len(z) for z in data.logits], dtype=torch.float64)
        for it in range(1, iterations + 1):
            b = int(torch.multinomial(sizes, 1, generator=g))
            z, x, y = data.logits[b], data.images[b], data.labels[b]
            pick = torch.randperm(len(z), generator=g)[:batch_slices].to(device)
            s, n = summed_nll(z[pick] / net(z[pick], x[pick] if use_image else None), y[pick], foreground_only)
            if n == 0:
                continue
            optim.zero_grad()
            (s / n).backward()
            optim.step()
            if it % eval_every == 0 or it == iterations:
                cur = fullsummed_nll()
                if cur < best_nll:
                    best_nll, best_state, best_it = cur, copy.deepcopy(net.state_dict()), it
        net.load_state_dict(best_state)
        net.train(was_training)
        return {"val_nll_before": before, "val_nll_after": best_nll, "best_iteration": best_it,
                "iterations": iterations, "seconds": time.time() - t0}

    # --- persistence -------------------------------------------------------------------------------------------
    def calibrator_state(self) -> dict:
        state = {k: v.detach().cpu() for k, v in self.temperature_net.state_dict().items()}
        return {"kind": self.kind, "config": dict(self.temperature_net.config), "state_dict": state}

    def load_calibrator_state(self, state: dict) -> None:
        check_kind(state, self.kind)
        self.temperature_net.load_state_dict(state["state_dict"])

    @classmethod
    def _from_state(cls, network: nn.Module, state: dict) -> LocalTemperatureScaling:
        net = TemperatureNet(**state["config"])
        net.load_state_dict(state["state_dict"])
        return cls(network, net)
