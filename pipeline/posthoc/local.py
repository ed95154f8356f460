"""Local temperature scaling (LTS; Ding et al., 2021) as the paper's released code used it: one temperature per
pixel from a small convolutional network over the logits and the image (:class:`ReferenceTemperatureNet`), and the
calibrator that wraps a segmentation network with it (:class:`LocalTemperatureScaling`)."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.posthoc.base import Calibrator, check_kind, slicewise
from pipeline.posthoc.slices import SliceSet, summed_nll
from pipeline.tensors import check_slice_axis

LTS_EPS = 1e-8


class ReflectConv2d(nn.Conv2d):
    """``Conv2d(in → out, kernel_size, dilation, padding = dilation·(kernel_size − 1)/2, padding_mode="reflect")``:
    the size is kept. Reflect padding needs every spatial side larger than the padding (4 for the reference 5×5
    kernel with dilation 2); a smaller input is padded with ``replicate`` instead (its border values repeated), so
    tiny slices still get a temperature. The parameters are ``nn.Conv2d``'s (``weight``, ``bias``)."""

    def __init__(self, in_channels: int, out_channels: int = 1, kernel_size: int = 5, dilation: int = 2) -> None:
        super().__init__(in_channels, out_channels, kernel_size, dilation=dilation,
                         padding=dilation * (kernel_size - 1) // 2, padding_mode="reflect", bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(pad_for_conv(x, self.padding[0]), self.weight, self.bias, dilation=self.dilation)


def pad_for_conv(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Pad the last two dims of ``B×C×H×W`` by ``pad`` on every side: ``reflect``, or ``replicate`` where a side is
    not larger than ``pad`` (reflect cannot pad it)."""
    mode = "reflect" if min(x.shape[-2:]) > pad else "replicate"
    return F.pad(x, (pad, pad, pad, pad), mode=mode)


class ReferenceTemperatureNet(nn.Module):
    """The LTS temperature network of the MbLS release: one temperature per pixel, ``B×1×H×W``, shared by the
    classes (Ding et al., 2021, "Local temperature scaling for probability calibration", ICCV; MbLS §5.2.2,
    Table 3).

    Nine single-channel :class:`ReflectConv2d` (5×5, dilation 2, reflect padding 4, with bias), named as in the
    released checkpoints so their fitted weights load as they are. All read the logits ``l`` (``K`` channels)
    except ``temperature_level_2_conv_img``, which reads the image ``x`` (``C`` channels). With σ the sigmoid:

    * leaves ``t_i = conv_i(l) + 1`` (i = 1..4); gates ``p_j = σ(param_j(l))`` (j = 1..3);
    * ``a = t_1 p_1 + t_2 (1 − p_1)``, ``b = t_3 p_2 + t_4 (1 − p_2)``, ``m_l = a p_3 + b (1 − p_3)``;
    * image branch ``m_x = conv_img(x) + 1`` and its gate ``g = σ(param_img(l))``;
    * ``T = relu(m_l g + m_x (1 − g) + 1) + 1e-8``.

    All-zero weights (the released initialisation, :meth:`init_constant` with 2) give ``T = 2`` everywhere;
    :meth:`init_constant` zeroes every weight and sets the five leaf biases so that ``T`` starts at any constant
    (1: the identity; the TS temperature). From any such constant start the tree stays symmetric while it is
    fitted: the four leaves get the same gradient (every gate is 0.5), so they stay equal, and the three gates
    ``p_j`` then get none (``∂T/∂p_1 ∝ t_1 − t_2 = 0``): the fitted model is one leaf of the logits mixed with the
    image branch by ``g`` (true of the released initialisation as much as of the others).

    ``T`` is positive, one per pixel for all classes, so ``l / T`` never changes the argmax. Over regions the
    network already gets right with confidence, fitting by NLL drives ``T`` down to its floor ``1e-8`` (the relu
    clamps), which makes the probabilities there one-hot.

    The eight convolutions of the logits are computed as one 8-channel convolution of the once-padded logits
    (the same function, one pass over the data).

    Args:
        num_classes: ``K``, the logit channels (>= 2).
        image_channels: ``C``, the image channels (>= 1).

    >>> net = ReferenceTemperatureNet(num_classes=4, image_channels=1)
    >>> net(torch.randn(2, 4, 16, 16), torch.rand(2, 1, 16, 16)).detach().unique()  # zero weights: T = 2
    tensor([2.])
    """

    model = "reference"
    LOGIT_CONVS = tuple(f"temperature_level_2_{n}" for n in
                        ("conv1", "conv2", "conv3", "conv4", "param1", "param2", "param3", "param_img"))
    IMAGE_CONV = "temperature_level_2_conv_img"

    def __init__(self, num_classes: int, image_channels: int = 1) -> None:
        super().__init__()
        if int(num_classes) < 2 or int(image_channels) < 1:
            raise ValueError(f"need num_classes >= 2 and image_channels >= 1, got {num_classes}, {image_channels}")
        self.config = {"num_classes": int(num_classes), "image_channels": int(image_channels)}
        # registration order: the released one (conv1-4, param1-3, conv_img, param_img)
        for name in self.LOGIT_CONVS[:7]:
            setattr(self, name, ReflectConv2d(num_classes))
        self.temperature_level_2_conv_img = ReflectConv2d(image_channels)
        self.temperature_level_2_param_img = ReflectConv2d(num_classes)
        self.init_constant(2.0)

    def init_constant(self, temperature: float = 2.0) -> None:
        """Zero every weight and gate bias, and set the leaves' biases to ``temperature − 2`` so that
        ``T = temperature`` everywhere (``temperature > 0``; 2 gives the released all-zero initialisation)."""
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        leaves = {f"temperature_level_2_conv{i}" for i in (1, 2, 3, 4)} | {self.IMAGE_CONV}
        with torch.no_grad():
            for name, conv in self.named_children():
                conv.weight.zero_()
                conv.bias.fill_(float(temperature) - 2.0 if name in leaves else 0.0)
        self.init_temperature = float(temperature)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], where: str = "") -> ReferenceTemperatureNet:
        """The network holding ``state_dict`` (e.g. LTS weights fitted by the released code), its class and image
        channel counts read from the shapes of ``temperature_level_2_conv1.weight`` (``1×K×5×5``) and
        ``temperature_level_2_conv_img.weight`` (``1×C×5×5``); loaded strictly.

        Raises:
            ValueError: keys or shapes that are not those of this network (named, with the expected keys).
        """
        def channels(conv: str, low: int) -> int:  # a missing or odd weight: the check below names it
            shape = tuple(getattr(state_dict.get(f"{conv}.weight"), "shape", ()))
            return max(int(shape[1]), low) if len(shape) == 4 else low

        net = cls(channels("temperature_level_2_conv1", 2), channels(cls.IMAGE_CONV, 1))
        net.load_checked(state_dict, where)
        return net

    def load_checked(self, state_dict: Mapping[str, torch.Tensor], where: str = "") -> None:
        """``load_state_dict(strict=True)`` with a clear error naming the missing and unexpected keys and the
        shapes expected (e.g. for weights fitted by the released code)."""
        check_state_keys(self, state_dict, where)
        self.load_state_dict(state_dict, strict=True)

    def forward(self, logits: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """``B×K×H×W`` logits and ``B×C×H×W`` image → ``B×1×H×W`` temperatures."""
        k, c = self.config["num_classes"], self.config["image_channels"]
        if logits.ndim != 4 or logits.shape[1] != k:
            raise ValueError(f"expected logits B×{k}×H×W, got shape {tuple(logits.shape)}")
        if image is None or image.ndim != 4 or image.shape[1] != c or image.shape[0] != logits.shape[0] \
                or image.shape[2:] != logits.shape[2:]:
            got = None if image is None else tuple(image.shape)
            raise ValueError(f"the reference LTS network takes the image {logits.shape[0]}×{c}×"
                             f"{tuple(logits.shape[2:])} with the logits, got {got}")
        convs = [getattr(self, n) for n in self.LOGIT_CONVS]
        w = torch.cat([m.weight for m in convs]).to(logits.dtype)
        bias = torch.cat([m.bias for m in convs]).to(logits.dtype)
        pad, dil = convs[0].padding[0], convs[0].dilation
        out = F.conv2d(pad_for_conv(logits, pad), w, bias, dilation=dil)  # B×8×H×W
        t1, t2, t3, t4 = (out[:, i : i + 1] + 1.0 for i in range(4))
        p1, p2, p3, g = (torch.sigmoid(out[:, i : i + 1]) for i in range(4, 8))
        a = t1 * p1 + t2 * (1 - p1)
        b = t3 * p2 + t4 * (1 - p2)
        m_l = a * p3 + b * (1 - p3)
        m_x = self.temperature_level_2_conv_img(image.to(logits.dtype)) + 1.0
        return F.relu(m_l * g + m_x * (1 - g) + 1.0) + LTS_EPS


def check_state_keys(net: nn.Module, state_dict: Mapping[str, torch.Tensor], where: str = "") -> None:
    """Raise a ``ValueError`` unless ``state_dict`` has exactly the keys and shapes of ``net.state_dict()``."""
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    given = {k: tuple(getattr(v, "shape", ())) for k, v in state_dict.items()}
    missing, unexpected = sorted(set(own) - set(given)), sorted(set(given) - set(own))
    shapes = sorted(k for k in set(own) & set(given) if own[k] != given[k])
    if missing or unexpected or shapes:
        where = f" in {where}" if where else ""
        parts = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else "",
                 ", ".join(f"{k} has shape {given[k]}, expected {own[k]}" for k in shapes)]
        raise ValueError(f"the {type(net).__name__} weights{where} do not match its parameters: "
                         f"{'; '.join(p for p in parts if p)} (expected keys: {', '.join(own)})")


# the temperature networks a saved LTS state may hold, by the name it records under ``model``
TEMPERATURE_NETS = {"reference": ReferenceTemperatureNet}


class LocalTemperatureScaling(Calibrator):
    """Local temperature scaling around a 2D network: ``forward(x) = logits / T(logits, x)``, ``T`` per pixel.

    Args:
        network: the trained 2D network ``B×C×H×W → B×K×H×W`` (its weights are not changed by fitting).
        temperature_net: the temperature network, :class:`ReferenceTemperatureNet` (the paper's Table 3).

    >>> lts = LocalTemperatureScaling(nn.Identity(), ReferenceTemperatureNet(num_classes=2, image_channels=1))
    >>> lts.calibrate(torch.full((1, 2, 8, 8), 4.0), torch.zeros(1, 1, 8, 8)).detach().unique()
    tensor([2.])
    """

    kind = "lts"

    def __init__(self, network: nn.Module, temperature_net: ReferenceTemperatureNet) -> None:
        super().__init__()
        self.network = network
        self.temperature_net = temperature_net

    def temperature_map(self, logits: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        """``B×1×H×W`` temperatures of ``B×K×H×W`` logits and their ``B×C×H×W`` image; 3D inputs are not accepted
        here (see :meth:`calibrate`)."""
        return self.temperature_net(logits, image)

    def calibrate(self, logits: torch.Tensor, image: torch.Tensor | None = None, slice_axis: int | None = None
                  ) -> torch.Tensor:
        """Calibrated logits of ``B×K×H×W`` slices (with their ``B×C×H×W`` image), or of ``B×K×X×Y×Z`` volumes
        (with ``B×C×X×Y×Z`` images) slice by slice along ``slice_axis`` (a spatial axis, 0-2, required for
        volumes)."""
        if logits.ndim == 5:
            check_slice_axis(slice_axis)
            return slicewise(lambda z, x: self.calibrate(z, x), logits, image, slice_axis)
        return logits / self.temperature_map(logits, image).to(logits.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.calibrate(self.network(x), x)

    def fit(
        self,
        slices: SliceSet,
        iterations: int = 100,
        lr: float = 1e-3,
        batch_slices: int = 16,
        eval_every: int = 10,
        foreground_only: bool = False,
        seed: int = 0,
    ) -> dict:
        """Fit the temperature network by NLL with Adam on validation slices; keep the state of lowest NLL.

        The fitting budget is ``iterations`` Adam steps (learning rate ``lr``) on mini-batches of up to
        ``batch_slices`` slices of one volume (volumes drawn in proportion to their slices, seeded by ``seed``);
        every ``eval_every`` steps (and before the first, and after the last) the mean NLL over all slices is
        measured and the best state so far kept, so the result is never worse on the validation slices than the
        starting state. The released code fitted with Adam lr 1e-4 from ``T = 2`` and kept the best state by
        validation NLL; the pipeline's defaults (``configs/base.yaml``, ``evaluation::lts``: 100 steps, lr 1e-3,
        from the TS temperature) reach in about a second on a CPU the validation NLL that the released recipe
        reaches in about 3000 steps on the default dataset.

        Args:
            slices: validation logits, images and labels (:func:`collect_slices`).
            foreground_only: count only ground-truth foreground voxels in the NLL (default: every voxel).

        Returns:
            ``{"val_nll_before", "val_nll_after", "best_iteration", "iterations", "seconds"}``.

        Raises:
            ValueError: bad budget values, or no voxel to fit on.
        """
        if iterations < 0 or batch_slices < 1 or eval_every < 1 or not lr > 0:
            raise ValueError(f"need iterations >= 0, lr > 0, batch_slices >= 1 and eval_every >= 1, got "
                             f"{iterations}, {lr}, {batch_slices}, {eval_every}")
        t0 = time.time()
        net = self.temperature_net
        device = next(net.parameters()).device
        data = slices.to(device)
        if (data.n_voxels if not foreground_only else sum(int((y != 0).sum()) for y in data.labels)) == 0:
            raise ValueError(f"local temperature scaling has no validation voxel to fit on (foreground_only="
                             f"{foreground_only})")

        def calibrated(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return z / net(z, x)

        def full_nll() -> float:
            total, count = 0.0, 0
            with torch.no_grad():
                for z, x, y in zip(data.logits, data.images, data.labels):
                    for k in range(0, len(z), batch_slices):
                        part = slice(k, k + batch_slices)
                        s, n = summed_nll(calibrated(z[part], x[part]), y[part], foreground_only)
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
            s, n = summed_nll(calibrated(z[pick], x[pick]), y[pick], foreground_only)
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
        """``{"kind": "lts", "model": "reference" (a name in :data:`TEMPERATURE_NETS`), "config": the constructor
        arguments, "state_dict": the temperature network's weights (the released key names)}``."""
        state = {k: v.detach().cpu() for k, v in self.temperature_net.state_dict().items()}
        return {"kind": self.kind, "model": self.temperature_net.model, "config": dict(self.temperature_net.config),
                "state_dict": state}

    def load_calibrator_state(self, state: dict) -> None:
        check_kind(state, self.kind)
        model = check_lts_model(state)
        if model != self.temperature_net.model:
            raise ValueError(f"the LTS state holds a '{model}' temperature network, this calibrator a "
                             f"'{self.temperature_net.model}' one")
        check_state_keys(self.temperature_net, state["state_dict"], "the LTS state")
        self.temperature_net.load_state_dict(state["state_dict"])

    @classmethod
    def _from_state(cls, network: nn.Module, state: dict) -> LocalTemperatureScaling:
        net = TEMPERATURE_NETS[check_lts_model(state)](**state["config"])
        check_state_keys(net, state["state_dict"], "the LTS state")
        net.load_state_dict(state["state_dict"])
        return cls(network, net)


def check_lts_model(state: dict) -> str:
    """The temperature network's model name of a saved LTS state; states of an older format (no ``model``: the
    former feature-layer network) or of an unknown model raise, saying to fit LTS again."""
    model = state.get("model")
    if model not in TEMPERATURE_NETS:
        raise ValueError(f"the LTS state holds a temperature network of model {model!r}, expected one of "
                         f"{sorted(TEMPERATURE_NETS)} (files written before the model was recorded hold an older "
                         "network: fit LTS again, e.g. make evaluate RUN=…)")
    return model
