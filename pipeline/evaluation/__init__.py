"""Test-time evaluation of trained runs: settings, the evaluation itself, its results, the noise sweep, the maps,
and ``make evaluate``."""

from pipeline.evaluation.evaluate import create_test_evaluator, evaluate_trained
from pipeline.evaluation.rerun import evaluate_run
from pipeline.evaluation.settings import default_settings, evaluation_settings

__all__ = ["create_test_evaluator", "default_settings", "evaluate_run", "evaluate_trained", "evaluation_settings"]
