"""Deterministic dataset splits: the paper's counts (proportional when a folder holds another number of cases),
optionally stratified, by subject, and leave-one-out folds.

Splits are made over *subjects* (``case["subject"]``, default the case id) so that all volumes of one patient (e.g.
ACDC's end-diastolic and end-systolic frames) land in the same split. The result maps ``train``/``val``/``test``
to case ids; it is what ``splits.json`` holds next to each run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pipeline.data.sources import SPLITS


def allocate(n: int, counts: Sequence[int]) -> list[int]:
    """Split ``n`` items into parts proportional to ``counts``.

    Exactly ``counts`` when ``n == sum(counts)``; otherwise the largest-remainder rounding of
    ``n * counts / sum(counts)`` (ties to the earlier part), then every part with a non-zero count gets at least one
    item when ``n`` allows it (taken from the largest part).

    >>> allocate(100, [70, 10, 20])
    [70, 10, 20]
    >>> allocate(10, [235, 35, 65])
    [7, 1, 2]

    Raises:
        ValueError: negative counts, or all counts zero.
    """
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) == 0:
        raise ValueError(f"split counts must be >= 0 with a positive sum, got {counts}")
    total = sum(counts)
    if n == total:
        return counts
    quotas = [n * c / total for c in counts]
    sizes = [math.floor(q) for q in quotas]
    order = sorted(range(len(counts)), key=lambda k: (-(quotas[k] - sizes[k]), k))
    for k in order[: n - sum(sizes)]:
        sizes[k] += 1
    wanted = [k for k, c in enumerate(counts) if c > 0]
    if n >= len(wanted):
        for k in wanted:
            if sizes[k] == 0:
                donor = max(range(len(sizes)), key=lambda j: (sizes[j], -j))
                sizes[donor] -= 1
                sizes[k] += 1
    return sizes


def _subjects(cases: Sequence[dict], stratify: str | None) -> tuple[list[str], dict[str, str]]:
    subjects: list[str] = []
    stratum: dict[str, str] = {}
    for c in cases:
        s = str(c.get("subject", c["id"]))
        if s not in stratum:
            subjects.append(s)
            stratum[s] = str(c.get(stratify, "")) if stratify else ""
    return sorted(subjects), stratum


def split_cases(
    cases: Sequence[dict],
    counts: Sequence[int],
    seed: int = 0,
    stratify: str | None = None,
    parts: Sequence[str] = SPLITS,
) -> dict[str, list[str]]:
    """A seeded random split of the subjects of ``cases`` into ``parts`` of sizes :func:`allocate` ``(n, counts)``.

    With ``stratify`` (a case key, e.g. ACDC's diagnostic ``group``), each stratum is divided in the same
    proportions (controlled rounding: the part sizes stay exact, each stratum's share is rounded to the nearest
    whole subject), so every split holds every stratum in proportion.

    Args:
        cases: dicts with ``id`` and optionally ``subject`` (the unit of the split; default the id) and the
            ``stratify`` key.
        counts: subjects per part, e.g. the paper's ``[70, 10, 20]``.
        seed: seed of the shuffle; the same seed and cases give the same split.
        stratify: the case key to stratify by, or ``None``.
        parts: names of the parts (default ``train``, ``val``, ``test``).

    Returns:
        ``{part: [case ids]}``, ids sorted within each part.
    """
    if len(counts) != len(parts):
        raise ValueError(f"expected {len(parts)} split counts ({', '.join(parts)}), got {list(counts)}")
    subjects, stratum = _subjects(cases, stratify)
    targets = allocate(len(subjects), counts)
    rng = np.random.default_rng(seed)
    groups: dict[str, list[str]] = {}
    for s in subjects:
        groups.setdefault(stratum[s], []).append(s)
    names = sorted(groups)
    n = len(subjects)
    # controlled rounding of the per-stratum shares: floors, then the largest fractional parts while both the
    # stratum and the part still miss subjects, then any remaining (row, column) pair with a deficit
    share = {(g, k): len(groups[g]) * targets[k] / n for g in names for k in range(len(parts))}
    alloc = {key: math.floor(v) for key, v in share.items()}
    row = {g: len(groups[g]) - sum(alloc[g, k] for k in range(len(parts))) for g in names}
    col = [targets[k] - sum(alloc[g, k] for g in names) for k in range(len(parts))]
    for g, k in sorted(share, key=lambda key: (-(share[key] - alloc[key]), names.index(key[0]), key[1])):
        if row[g] > 0 and col[k] > 0:
            alloc[g, k] += 1
            row[g] -= 1
            col[k] -= 1
    for g in names:
        for k in range(len(parts)):
            while row[g] > 0 and col[k] > 0:
                alloc[g, k] += 1
                row[g] -= 1
                col[k] -= 1
    part_of: dict[str, str] = {}
    for g in names:
        members = [groups[g][i] for i in rng.permutation(len(groups[g]))]
        start = 0
        for k, part in enumerate(parts):
            for s in members[start : start + alloc[g, k]]:
                part_of[s] = part
            start += alloc[g, k]
    out: dict[str, list[str]] = {p: [] for p in parts}
    for c in cases:
        out[part_of[str(c.get("subject", c["id"]))]].append(c["id"])
    return {p: sorted(ids) for p, ids in out.items()}


def leave_one_out(cases: Sequence[dict], fold: int) -> dict[str, list[str]]:
    """Fold ``fold`` of a leave-one-subject-out cross-validation over the sorted subjects.

    The test split is subject ``fold``; the validation split (for model selection) is the next subject
    (cyclically); the rest is training.

    Raises:
        ValueError: ``fold`` outside ``[0, number of subjects)`` or fewer than 3 subjects.
    """
    subjects, _ = _subjects(cases, None)
    n = len(subjects)
    if n < 3:
        raise ValueError(f"leave-one-out needs at least 3 subjects, got {n}")
    if not 0 <= int(fold) < n:
        raise ValueError(f"fold must be in [0, {n - 1}] (one per subject: {', '.join(subjects)}), got {fold}")
    test, val = subjects[int(fold)], subjects[(int(fold) + 1) % n]
    out: dict[str, list[str]] = {p: [] for p in SPLITS}
    for c in cases:
        s = str(c.get("subject", c["id"]))
        out["test" if s == test else "val" if s == val else "train"].append(c["id"])
    return {p: sorted(ids) for p, ids in out.items()}
