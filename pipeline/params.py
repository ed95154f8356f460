"""What a training run logs as MLflow parameters beside its names: config blocks with their references resolved,
and the training protocol, so that runs can be told apart and compared in the UI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.tracking import flatten


def resolved_params(parser, key: str) -> dict[str, Any]:
    """:func:`flatten` of the config block ``key`` with every ``@reference`` and ``$expression`` leaf replaced by
    its value (``backbone.in_channels`` = 1, not ``@in_channels``); a value that is not a plain number, string or
    flag is logged as its text.

    >>> from monai.bundle import ConfigParser
    >>> resolved_params(ConfigParser({"c": 3, "net": {"_target_": "x", "ch": "@c", "k": "$@c * 2"}}), "net")
    {'net.ch': 3, 'net.k': 6}
    """
    out = {}
    for name, value in flatten(key, parser.get(key)).items():
        if isinstance(value, str) and value.startswith(("@", "$")):
            try:
                value = parser.get_parsed_content("::".join([key, *name.split(".")[1:]]))
            except Exception:  # noqa: BLE001 - a leaf that cannot be evaluated alone is logged as written
                pass
        out[name] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)
    return out


def protocol_params(parser) -> dict[str, Any]:
    """The training protocol as parameters, so that runs of different protocols can be told apart in the UI:
    ``protocol.augment`` (the augmentation transforms, or ``none``), ``protocol.val_interval``,
    ``protocol.lr_step``, ``protocol.lr_gamma``, ``protocol.optimizer``, ``protocol.lr_scheduler``."""
    augment = parser.get("augment") or []
    names = [str(t.get("_target_", "?")).rsplit(".", 1)[-1] for t in augment if isinstance(t, Mapping)]
    out = {"protocol.augment": ",".join(names) or "none"}
    for key in ("val_interval", "lr_step", "lr_gamma"):
        try:
            out[f"protocol.{key}"] = parser.get_parsed_content(key)
        except Exception:  # noqa: BLE001 - a config without the key
            continue
    for key in ("optimizer", "lr_scheduler"):
        block = parser.get(key)
        if isinstance(block, Mapping) and "_target_" in block:
            out[f"protocol.{key}"] = str(block["_target_"]).rsplit(".", 1)[-1]
    return out
