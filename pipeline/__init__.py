"""MbLS pipeline: calibrated medical image segmentation with MONAI, Ignite and MLflow."""

__version__ = "0.1.0"
