"""Post-hoc calibration: temperature scaling (TS) and local temperature scaling (LTS), fitted on validation slices.

Both are ``nn.Module`` wrappers around a trained segmentation network (paper §5.2.2, Table 3): ``forward(x)`` runs
the network and returns calibrated logits, so any inferer, evaluator or exported bundle can use them in place of
the network. :meth:`calibrate` applies the calibration to logits already computed (the evaluation runs the network
once and scores the uncalibrated and calibrated outputs from the same logits).

* **TS** (Guo et al., 2017): one temperature ``T > 0`` for every pixel, ``logits / T``; fitted by minimising the
  NLL on validation logits over ``log T`` with L-BFGS. The argmax never changes.
* **LTS** (Ding et al., 2021, as the paper's released code used it): a temperature per pixel from the logits and
  the image (:class:`ReferenceTemperatureNet`: nine 5×5 dilated convolutions, a gated tree, ``T = 2`` at zero
  weights); fitted by NLL with Adam on the validation slices only, keeping the state with the lowest validation
  NLL. The argmax never changes either: a pixel's logits are all divided by the same positive temperature.

The fitted state (a temperature, or the temperature network's model name, constructor arguments and weights) is a
small file saved with the run (:meth:`save_calibrator` / :meth:`load_calibrator`); the wrapped network's own weights
are not part of it.

Tensor convention: 2D networks, logits ``B×K×H×W``, images ``B×C×H×W``, labels ``B×H×W`` (integer classes).
"""

from __future__ import annotations

from pipeline.posthoc.base import Calibrator, load_state
from pipeline.posthoc.fitting import fit_calibrators, validation_ece
from pipeline.posthoc.local import (
    LTS_EPS,
    TEMPERATURE_NETS,
    LocalTemperatureScaling,
    ReferenceTemperatureNet,
    ReflectConv2d,
    check_lts_model,
    check_state_keys,
)
from pipeline.posthoc.settings import (
    LTS_INIT_TEMPERATURES,
    LTS_INITS,
    check_lts_settings,
)
from pipeline.posthoc.slices import SliceSet, collect_slices
from pipeline.posthoc.temperature import TemperatureScaling

__all__ = [
    "LTS_EPS",
    "LTS_INITS",
    "LTS_INIT_TEMPERATURES",
    "TEMPERATURE_NETS",
    "Calibrator",
    "LocalTemperatureScaling",
    "ReferenceTemperatureNet",
    "ReflectConv2d",
    "SliceSet",
    "TemperatureScaling",
    "check_lts_model",
    "check_lts_settings",
    "check_state_keys",
    "collect_slices",
    "fit_calibrators",
    "load_state",
    "validation_ece",
]
