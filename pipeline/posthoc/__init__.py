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

from pipeline.posthoc.base import Calibrator, load_state
from pipeline.posthoc.fitting import fit_calibrators, validation_ece
from pipeline.posthoc.local import LTS_EPS, LocalTemperatureScaling, TemperatureNet
from pipeline.posthoc.slices import SliceSet, collect_slices
from pipeline.posthoc.temperature import TemperatureScaling

__all__ = [
    "LTS_EPS",
    "Calibrator",
    "LocalTemperatureScaling",
    "SliceSet",
    "TemperatureNet",
    "TemperatureScaling",
    "collect_slices",
    "fit_calibrators",
    "load_state",
    "validation_ece",
]
