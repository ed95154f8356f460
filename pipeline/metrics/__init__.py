"""Segmentation and calibration metrics: plain functions for one volume, Ignite metrics around them."""

from pipeline.metrics.calibration import (
    CalibrationMetrics,
    CalibrationStats,
    brier,
    calibration_statistics,
    cece,
    ece,
    nll,
)

__all__ = ["CalibrationMetrics", "CalibrationStats", "brier", "calibration_statistics", "cece", "ece", "nll"]
