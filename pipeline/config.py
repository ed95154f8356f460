"""Layered configuration in MONAI bundle syntax.

A run's config is ``configs/base.yaml`` + ``configs/dataset/<dataset>.yaml`` + ``configs/loss/<loss>.yaml`` +
``configs/backbone/<backbone>.yaml``, then command-line overrides, merged by MONAI's ``ConfigParser`` (a later file
replaces a top-level key, ``a::b`` keys reach into nested ones, ``+key`` merges). Components are wired with
``_target_``, ``@id`` and ``$expr``; code never branches on a dataset, loss or backbone name.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import Any

import yaml

from pipeline.registry import check_name

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(os.environ.get("MBLS_CONFIG_DIR", REPO_ROOT / "configs"))
KINDS = ("dataset", "loss", "backbone")

#: a YAML 1.2 float: ``1e6``, ``1e-3``, ``1.5e3``, ``-2E+4`` (YAML 1.1, PyYAML's dialect, reads these as strings)
FLOAT_PATTERN = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")


class NumberLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads YAML 1.2 floats (``1e6``, ``1e-3``) as numbers; a quoted ``"1e6"``
    stays a string."""


class ConfigLoader(NumberLoader):
    """:class:`NumberLoader` that refuses a key repeated in one mapping (as MONAI's config reader does)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise ValueError(f"{mark.name}, line {mark.line + 1}: the key '{key}' appears twice in one mapping")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


NumberLoader.add_implicit_resolver("tag:yaml.org,2002:float", FLOAT_PATTERN, list("-+.0123456789"))


def load_yaml(path: str | os.PathLike) -> Any:
    """A YAML file read with :class:`ConfigLoader` (numbers such as ``1e-3`` are floats, repeated keys refused).

    Raises:
        ValueError: a key repeated in one mapping, naming the file and line.
    """
    with open(path) as f:
        return yaml.load(f, ConfigLoader)


def quiet_warnings() -> None:
    """Silence warnings that say nothing about a run: MONAI announces a future default of ``Orientationd`` at every
    construction (it does not affect these configs)."""
    warnings.filterwarnings("ignore", message=".*Current default value of argument.*")


def available(kind: str, config_dir: Path | None = None) -> list[str]:
    """The names that have a ``configs/<kind>/<name>.yaml`` file."""
    folder = Path(config_dir or CONFIG_DIR) / check_name(kind, KINDS, "config kind")
    return sorted(p.stem for p in folder.glob("*.yaml"))


def config_files(dataset: str, loss: str, backbone: str, config_dir: Path | None = None) -> list[Path]:
    """The files of a run, in merge order; an unknown name raises with "did you mean …" and the valid names."""
    root = Path(config_dir or CONFIG_DIR)
    files = [root / "base.yaml"]
    for kind, name in zip(KINDS, (dataset, loss, backbone)):
        files.append(root / kind / f"{check_name(name, available(kind, root), kind)}.yaml")
    return files


def parse_value(text: str) -> Any:
    """A command-line value as YAML (``3`` → int, ``0.1`` and ``1e-3`` → float, ``[1, 2]`` → list, ``abc`` → str;
    ``$``/``@`` expressions stay strings).

    >>> parse_value("1e6"), parse_value("[1e-3, 2]"), parse_value("'1e6'")
    (1000000.0, [0.001, 2], '1e6')
    """
    try:
        return yaml.load(text, NumberLoader)
    except yaml.YAMLError:
        return text


def parse_assignments(items: list[str] | str | None, prefix: str = "") -> dict[str, Any]:
    """``["a::b=1", "c=x"]`` or ``"a=1,b=2"`` → ``{"a::b": 1, "c": "x"}``; ``prefix`` is prepended to each key.

    Raises:
        ValueError: an item without ``=``.
    """
    if not items:
        return {}
    if isinstance(items, str):
        items = [p for p in (s.strip() for s in _split_commas(items)) if p]
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got '{item}'")
        out[prefix + key.strip()] = parse_value(value.strip())
    return out


def _split_commas(text: str) -> list[str]:
    """Split on commas outside brackets, so ``a=[1, 2],b=3`` gives two items."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def load_config(
    dataset: str = "mni",
    loss: str = "mbls",
    backbone: str = "unet",
    overrides: dict[str, Any] | None = None,
    config_dir: Path | None = None,
):
    """Build the ``ConfigParser`` of a run.

    Args:
        dataset, loss, backbone: names of files under ``configs/<kind>/``.
        overrides: ``{"id::path": value}`` applied last (e.g. ``{"epochs": 5, "loss::margin": 8}``).

    Raises:
        pipeline.registry.UnknownNameError: an unknown dataset, loss or backbone name.
        KeyError: an override of a key that the config does not have.
    """
    files = config_files(dataset, loss, backbone, config_dir)  # name check first: fails fast, before MONAI loads
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(merge_files(files))
    parser["dataset_name"], parser["loss_name"], parser["backbone_name"] = dataset, loss, backbone
    apply_overrides(parser, overrides)
    return parser


def load_run_config(path: str | os.PathLike):
    """The ``ConfigParser`` of a run's saved ``config.yaml`` (read with :func:`load_yaml`).

    Raises:
        FileNotFoundError: no such file.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"no run config {path}")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(merge_files([Path(path)]))
    return parser


def merge_files(files: list[Path]) -> dict:
    """The config of ``files`` merged in order as MONAI's ``ConfigParser.read_config`` merges them (a later file
    replaces a top-level key, ``a::b`` reaches into nested ones, ``+key`` merges), each read by :func:`load_yaml`
    so that numbers such as ``1e-3`` are floats."""
    from monai.bundle import ConfigParser
    from monai.bundle.utils import merge_kv

    merged = ConfigParser(config={})
    for f in files:
        content = load_yaml(f) or {}
        if not isinstance(content, dict):
            raise ValueError(f"{f}: expected a mapping of config keys, got {type(content).__name__}")
        for k, v in content.items():
            merge_kv(merged, k, v)
    return merged.get()


def apply_overrides(parser, overrides: dict[str, Any] | None, what: str = "the config") -> None:
    """Set ``{"id::path": value}`` in ``parser``; a key whose parent (or top-level key) does not exist is refused.

    Raises:
        KeyError: naming the key and what is missing.
    """
    for key, value in (overrides or {}).items():
        parent, _, leaf = key.rpartition("::")
        if parent and parent not in parser:
            raise KeyError(f"cannot override '{key}': {what} has no '{parent}'")
        if not parent and leaf not in parser.get():
            raise KeyError(f"cannot override '{key}': {what} has no top-level key '{leaf}'")
        parser[key] = value


#: the numbers of a training run: ``key: (whole number?, smallest, smallest allowed, largest, what it is)``
TRAINING_NUMBERS = {
    "epochs": (True, 1, True, None, "training epochs"),
    "batch_size": (True, 1, True, None, "training slices per batch"),
    "val_interval": (True, 1, True, None, "epochs between two validations"),
    "checkpoint_interval": (True, 1, True, None, "epochs between two writes of checkpoints/last.pt"),
    "lr_step": (True, 1, True, None, "epochs between two learning-rate decays"),
    "lr": (False, 0, False, None, "the learning rate"),
    "lr_gamma": (False, 0, False, None, "the learning-rate decay factor"),
    "num_workers": (True, 0, True, None, "data-loading worker processes"),
    "seed": (True, 0, True, 2**32 - 1, "the random seed"),
    "n_bins": (True, 1, True, None, "calibration bins"),
    "cache_memory_fraction": (False, 0, False, 1, "the share of the available memory the cache may take"),
}


def check_training_values(parser) -> None:
    """Refuse a training config whose numbers (:data:`TRAINING_NUMBERS`) are of the wrong type or out of range,
    before anything is created.

    Raises:
        ValueError: naming the key, the value and the allowed range.
    """
    for key, (whole, low, low_allowed, high, what) in TRAINING_NUMBERS.items():
        if key not in parser.get():
            continue
        kind = "a whole number" if whole else "a number"
        allowed = f"{kind} {'>=' if low_allowed else '>'} {low}" + ("" if high is None else f" and <= {high}")
        try:
            value = parser.get_parsed_content(key)
        except Exception as e:  # an expression that fails, e.g. lr_step from epochs=abc
            cause = " ".join(str(e.__cause__ or e).split())  # MONAI's wrapper says only which expression
            raise ValueError(f"config key '{key}' ({what}) cannot be evaluated ({parser.get(key)!r}: {cause}); "
                             f"expected {allowed}") from None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = number and math.isfinite(value) and (not whole or float(value).is_integer())
        ok = ok and (value >= low if low_allowed else value > low) and (high is None or value <= high)
        if not ok:
            raise ValueError(f"config key '{key}' ({what}) must be {allowed}, got {value!r}")
