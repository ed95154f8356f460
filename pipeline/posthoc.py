"""Post-hoc calibration: temperature scaling (TS) and local temperature scaling (LTS), fitted on validation slices.

Both are ``nn.Module`` wrappers around a trained segmentation network (paper §5.2.2, Table 3): ``forward(x)`` runs
the network and returns calibrated logits, so any inferer, evaluator or exported bundle can use them in place of
the network. :meth:`calibrate` applies the calibration to logits already computed (the evaluation runs the network
once and scores the uncalibrated and calibrated outputs from the same logits).

* **TS** (Guo et al., 2017): one temperature ``T > 0`` for every pixel, ``logits / T``; fitted by minimising the
  NLL on validation logits over ``log T`` with L-BFGS. The argmax never changes.
* **LTS** (Ding et al., 2021): a small convolutional network predicts one temperature per pixel from the logits
  and, optionally, the image (:class:`TemperatureNet`); ``T = relu(x + 1) + 1e-8``; fitted by NLL with Adam on the
  validation slices only, keeping the state with the lowest validation NLL. The argmax may change.

The fitted state (a temperature, or the temperature network's weights and its constructor arguments) is a small
file saved with the run (:meth:`save_calibrator` / :meth:`load_calibrator`); the wrapped network's own weights are
not part of it.

Tensor convention: 2D networks, logits ``B×K×H×W``, images ``B×C×H×W``, labels ``B×H×W`` (integer classes).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.io import save_torch_atomic
from pipeline.tensors import check_slice_axis, plain

LTS_EPS = 1e-8


# --------------------------------------------------------------------------------------------------------------
# validation slices
@dataclass
class SliceSet:
    """2D validation slices grouped by volume (slices of one volume share their size).

    Attributes:
        logits: per volume ``S×K×H×W`` float32 (the frozen network's outputs).
        images: per volume ``S×C×H×W`` float32 (the network's inputs).
        labels: per volume ``S×H×W`` int64.
    """

    logits: list[torch.Tensor] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    labels: list[torch.Tensor] = field(default_factory=list)

    @property
    def n_slices(self) -> int:
        return sum(len(z) for z in self.logits)

    @property
    def n_voxels(self) -> int:
        return sum(y.numel() for y in self.labels)

    def to(self, device) -> SliceSet:
        return SliceSet(*([t.to(device) for t in ts] for ts in (self.logits, self.images, self.labels)))


@torch.no_grad()
def collect_slices(
    network: nn.Module,
    volumes: Iterable[dict],
    slice_axis: int = 2,
    device: torch.device | str = "cpu",
    max_slices: int | None = None,
    seed: int = 0,
    sw_batch_size: int = 32,
) -> SliceSet:
    """Run the frozen ``network`` over every 2D slice of the given volumes and keep logits, images and labels.

    Args:
        network: a 2D network ``B×C×H×W → B×K×H×W`` (put in eval mode here).
        volumes: dicts with ``image`` ``C×X×Y×Z`` and ``label`` ``1×X×Y×Z`` (e.g. a cached volume dataset, or a
            loader of batch size 1, whose items then carry a leading batch axis of 1).
        slice_axis: the spatial axis (0, 1 or 2) to slice along.
        max_slices: keep at most this many slices in all, a seeded uniform draw (default: all).
        seed: seed of that draw.

    Raises:
        ValueError: no volume, a volume that is not ``C×X×Y×Z``, or labels of another size than the image.
    """
    check_slice_axis(slice_axis)
    device = torch.device(device)
    network.eval()
    blocks = []
    for i, item in enumerate(volumes):
        image, label = plain(item["image"]), plain(item["label"])
        if image.ndim == 5:
            image, label = image[0], label[0]
        if image.ndim != 4:
            raise ValueError(f"volume {i}: expected an image C×X×Y×Z, got shape {tuple(image.shape)}")
        if label.shape[-3:] != image.shape[-3:]:
            raise ValueError(f"volume {i}: label shape {tuple(label.shape)} does not match image {tuple(image.shape)}")
        x = image.movedim(slice_axis + 1, 0).float()  # S×C×H×W
        y = label.reshape(-1, *label.shape[-3:])[0].movedim(slice_axis, 0).round().long()  # S×H×W
        blocks.append((x, y))
    if not blocks:
        raise ValueError("no validation volume to collect slices from")
    index = [(b, s) for b, (x, _) in enumerate(blocks) for s in range(len(x))]
    if max_slices is not None and len(index) > max_slices:
        g = torch.Generator().manual_seed(seed)
        keep = sorted(torch.randperm(len(index), generator=g)[:max_slices].tolist())
        index = [index[k] for k in keep]
    out = SliceSet()
    for b, (x, y) in enumerate(blocks):
        chosen = [s for bb, s in index if bb == b]
        if not chosen:
            continue
        xs, ys = x[chosen], y[chosen]
        zs = torch.cat([network(xs[k : k + sw_batch_size].to(device)).float().cpu()
                        for k in range(0, len(xs), sw_batch_size)])
        out.logits.append(zs)
        out.images.append(xs.cpu())
        out.labels.append(ys.cpu())
    return out


def _nll(logits: torch.Tensor, labels: torch.Tensor, foreground_only: bool) -> tuple[torch.Tensor, int]:
    """Summed NLL and the number of voxels counted (``B×K×H×W`` logits, ``B×H×W`` labels)."""
    loss = F.cross_entropy(logits, labels, reduction="none")
    if foreground_only:
        keep = labels != 0
        return loss[keep].sum(), int(keep.sum())
    return loss.sum(), loss.numel()


# --------------------------------------------------------------------------------------------------------------
# temperature scaling
class _Calibrator(nn.Module):
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
        state = _load_state(path)
        _check_kind(state, cls.kind, path)
        return cls._from_state(network, state)

    @classmethod
    def _from_state(cls, network: nn.Module, state: dict):  # pragma: no cover - defined by every subclass
        raise NotImplementedError


class TemperatureScaling(_Calibrator):
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
        _check_kind(state, self.kind)
        with torch.no_grad():
            self.log_temperature.fill_(math.log(float(state["temperature"])))

    @classmethod
    def _from_state(cls, network: nn.Module, state: dict) -> TemperatureScaling:
        return cls(network, float(state["temperature"]))


# --------------------------------------------------------------------------------------------------------------
# local temperature scaling
class _PadConv(nn.Module):
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

        def conv(i: int, o: int) -> _PadConv:
            return _PadConv(i, o, kernel_size, dilation)

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


class LocalTemperatureScaling(_Calibrator):
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
            return _slicewise(lambda z, x: self.calibrate(z, x), logits, image, slice_axis)
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

        def full_nll() -> float:
            total, count = 0.0, 0
            with torch.no_grad():
                for z, x, y in zip(data.logits, data.images, data.labels):
                    for k in range(0, len(z), batch_slices):
                        s, n = _nll(z[k : k + batch_slices] / net(z[k : k + batch_slices],
                                                                   x[k : k + batch_slices] if use_image else None),
                                    y[k : k + batch_slices], foreground_only)
                        total, count = total + float(s), count + n
            return total / max(count, 1)

        was_training = net.training
        net.train()
        best_nll = before = full_nll()
        best_state, best_it = copy.deepcopy(net.state_dict()), 0
        optim = torch.optim.Adam(net.parameters(), lr=lr)
        g = torch.Generator().manual_seed(seed)
        sizes = torch.tensor([len(z) for z in data.logits], dtype=torch.float64)
        for it in range(1, iterations + 1):
            b = int(torch.multinomial(sizes, 1, generator=g))
            z, x, y = data.logits[b], data.images[b], data.labels[b]
            pick = torch.randperm(len(z), generator=g)[:batch_slices].to(device)
            s, n = _nll(z[pick] / net(z[pick], x[pick] if use_image else None), y[pick], foreground_only)
            if n == 0:
                continue
            optim.zero_grad()
            (s / n).backward()
            optim.step()
            if it % eval_every == 0 or it == iterations:
                cur = full_nll()
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
        _check_kind(state, self.kind)
        self.temperature_net.load_state_dict(state["state_dict"])

    @classmethod
    def _from_state(cls, network: nn.Module, state: dict) -> LocalTemperatureScaling:
        net = TemperatureNet(**state["config"])
        net.load_state_dict(state["state_dict"])
        return cls(network, net)


def _slicewise(fn, volume: torch.Tensor, image: torch.Tensor | None, slice_axis: int) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------------------------
# files
def _load_state(path: str | os.PathLike) -> dict:
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


def _check_kind(state: dict, kind: str, path=None) -> None:
    if state.get("kind") != kind:
        where = f" in {path}" if path else ""
        raise ValueError(f"expected a '{kind}' calibrator{where}, got '{state.get('kind')}'")
