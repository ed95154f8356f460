"""Layered configuration in MONAI bundle syntax.

A run's config is ``configs/base.yaml`` + ``configs/dataset/<dataset>.yaml`` + ``configs/loss/<loss>.yaml`` +
``configs/backbone/<backbone>.yaml``, then command-line overrides, merged by MONAI's ``ConfigParser`` (a later file
replaces a top-level key, ``a::b`` keys reach into nested ones, ``+key`` merges). Components are wired with
``_target_``, ``@id`` and ``$expr``; code never branches on a dataset, loss or backbone name.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import yaml

from pipeline.registry import check_name

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = Path(os.environ.get("MBLS_CONFIG_DIR", REPO_ROOT / "configs"))
KINDS = ("dataset", "loss", "backbone")


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
    """A command-line value as YAML (``3`` → int, ``0.1`` → float, ``[1, 2]`` → list, ``abc`` → str)."""
    try:
        return yaml.safe_load(text)
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
    parser.read_config([str(f) for f in files])
    parser["dataset_name"], parser["loss_name"], parser["backbone_name"] = dataset, loss, backbone
    apply_overrides(parser, overrides)
    return parser


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
