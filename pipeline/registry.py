"""Name checks shared by the loss, dataset and backbone registries."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UnknownNameError(ValueError):
    """A component name that is not registered; the message lists the valid names."""


def check_name(name: str, valid: Iterable[str], kind: str) -> str:
    """Return ``name`` if it is one of ``valid``; otherwise raise with "did you mean …" and the full list.

    >>> check_name("mbls", ["ce", "mbls"], "loss")
    'mbls'
    """
    valid = sorted(valid)
    if name in valid:
        return name
    close = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise UnknownNameError(f"unknown {kind} '{name}'.{hint} Valid {kind} names: {', '.join(valid)}")
