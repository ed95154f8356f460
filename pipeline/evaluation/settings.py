"""The ``evaluation`` settings of a run: what the test evaluation does (post-hoc calibration, noise, maps, extras).

Their defaults are the ``evaluation`` block of ``configs/base.yaml`` (one place); a run's own block overrides them,
and a run whose saved config predates a setting gets the default.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import lru_cache

import yaml

from pipeline.config import CONFIG_DIR
from pipeline.posthoc import check_lts_settings
from pipeline.registry import check_name

POSTHOC_METHODS = ("ts", "lts")


@lru_cache(maxsize=4)
def _base_block(path: str) -> dict:
    return yaml.safe_load(open(path))["evaluation"]


def default_settings() -> dict:
    """A copy of the ``evaluation`` block of ``configs/base.yaml``."""
    return copy.deepcopy(_base_block(str(CONFIG_DIR / "base.yaml")))


def _merge(defaults: Mapping, given: Mapping, where: str) -> dict:
    out = copy.deepcopy(dict(defaults))
    for key, value in given.items():
        check_name(str(key), defaults.keys(), f"setting of {where}")
        if isinstance(defaults[key], Mapping):
            if not isinstance(value, Mapping):
                raise ValueError(f"{where}::{key} must be a mapping like {dict(defaults[key])}, got {value!r}")
            out[key] = _merge(defaults[key], value, f"{where}::{key}")
        else:
            out[key] = value
    return out


def evaluation_settings(block: Mapping | None) -> dict:
    """The ``evaluation`` block of a config completed with :func:`default_settings` and checked.

    Raises:
        pipeline.registry.UnknownNameError: an unknown setting (with "did you mean …").
        ValueError: a value of the wrong kind (negative budget, unknown post-hoc method, negative sigma, …).
    """
    defaults = default_settings()
    given = dict(block or {})
    lts = check_lts_settings(given.pop("lts", None), defaults["lts"])  # first: it drops keys of older versions
    s = _merge(defaults, given, "evaluation")
    s["lts"] = lts
    posthoc = s["posthoc"] or []
    if isinstance(posthoc, str):
        posthoc = [posthoc]
    s["posthoc"] = [check_name(str(m), POSTHOC_METHODS, "post-hoc method") for m in posthoc]
    for key, value in (("max_val_slices", s["max_val_slices"]), ("ts::max_iter", s["ts"]["max_iter"]),
                       ("maps::slices", s["maps"]["slices"]), ("maps::volumes", s["maps"]["volumes"])):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"evaluation::{key} must be a whole number >= 0, got {value!r}")
    sigmas = s["noise"]["sigmas"] or []
    if not isinstance(sigmas, (list, tuple)) or any(not isinstance(v, (int, float)) or v < 0 for v in sigmas):
        raise ValueError(f"evaluation::noise::sigmas must be a list of numbers >= 0, got {sigmas!r}")
    s["noise"]["sigmas"] = [float(v) for v in sigmas]
    return s
