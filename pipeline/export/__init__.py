"""Export of trained runs as MONAI bundles that run with MONAI alone, and their verification.

``make export RUN=<run> [NAME=<name>]`` → :func:`export_bundle` writes ``bundles/<name>/`` (model-zoo layout:
configs, TorchScript and state-dict weights with their sha256, vendored scripts, model card) and logs it into the
run's MLflow run. ``make verify-bundle NAME=<name>`` → :func:`verify_bundle` runs MONAI's checks on it offline (those
that run the bundle's configs and scripts only with ``TRUST=1``: a bundle is code).

Modules: :mod:`~pipeline.export.bundle` (the export), :mod:`~pipeline.export.configs` (inference, evaluate and
train configs), :mod:`~pipeline.export.transforms` (a run's transforms made plain), :mod:`~pipeline.export.scripts`
(vendoring into ``scripts/``; the vendored loss sources live in :mod:`pipeline.export.bundle_scripts`),
:mod:`~pipeline.export.torchscript` (the shipped model), :mod:`~pipeline.export.metadata`,
:mod:`~pipeline.export.card` (model card), :mod:`~pipeline.export.dataset` (datalist and data layout),
:mod:`~pipeline.export.mlflow_logging`, :mod:`~pipeline.export.verify`.
"""

from pipeline.export.bundle import BUNDLES_DIR, CALIBRATIONS, SCHEMA_FILE, default_bundle_name, export_bundle, sha256
from pipeline.export.transforms import image_preprocessing, labelled_preprocessing
from pipeline.export.verify import (
    WeightFileError,
    check_large_files,
    load_bundle_model,
    load_bundle_weights,
    verify_bundle,
)

__all__ = [
    "BUNDLES_DIR",
    "CALIBRATIONS",
    "SCHEMA_FILE",
    "WeightFileError",
    "check_large_files",
    "default_bundle_name",
    "export_bundle",
    "image_preprocessing",
    "labelled_preprocessing",
    "load_bundle_model",
    "load_bundle_weights",
    "sha256",
    "verify_bundle",
]
