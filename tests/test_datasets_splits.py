"""Splits: the paper's counts, proportional otherwise, seeded, by subject, stratified; leave-one-out; a user's file."""

import json
from collections import Counter

import pytest

from pipeline.data.splits import allocate, leave_one_out, split_cases

PAPER = {"acdc": (100, [70, 10, 20]), "brats": (335, [235, 35, 65]), "flare": (360, [240, 40, 80]),
         "promise": (32, [22, 3, 7]), "hippocampus": (260, [185, 25, 50]), "busi": (647, [445, 65, 137])}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_counts_when_the_folder_holds_the_paper_number_of_cases(name):
    n, counts = PAPER[name]
    assert allocate(n, counts) == counts


@pytest.mark.parametrize("n, counts, expected", [
    (10, [70, 10, 20], [7, 1, 2]),
    (10, [235, 35, 65], [7, 1, 2]),
    (361, [240, 40, 80], [241, 40, 80]),     # FLARE's 361 files: same proportions, every case used
    (50, [22, 3, 7], [34, 5, 11]),           # PROMISE12's 50 cases
    (3, [70, 10, 20], [1, 1, 1]),            # every split non-empty when possible
    (2, [70, 10, 20], [1, 0, 1]),
    (7, [4, 1, 2], [4, 1, 2]),
    (5, [1, 0, 1], [3, 0, 2]),
])
def test_proportional_allocation(n, counts, expected):
    assert allocate(n, counts) == expected and sum(expected) == n


def test_bad_counts():
    with pytest.raises(ValueError, match="split counts must be >= 0"):
        allocate(5, [0, 0, 0])
    with pytest.raises(ValueError, match="expected 3 split counts"):
        split_cases([{"id": "a"}], [1, 1])


def _cases(n_subjects, frames=1, groups=None):
    return [{"id": f"s{i:03d}_f{f}", "subject": f"s{i:03d}", "group": groups[i % len(groups)] if groups else ""}
            for i in range(n_subjects) for f in range(frames)]


def test_seeded_deterministic_and_by_subject():
    cases = _cases(20, frames=2)
    a, b, c = (split_cases(cases, [70, 10, 20], seed) for seed in (0, 0, 1))
    assert a == b and a != c
    assert [len(a[p]) for p in ("train", "val", "test")] == [28, 4, 8]  # 14/2/4 subjects, two frames each
    part = {i: p for p, ids in a.items() for i in ids}
    assert all(part[f"s{i:03d}_f0"] == part[f"s{i:03d}_f1"] for i in range(20))


def test_stratified_split_keeps_each_group_in_proportion():
    cases = _cases(100, groups=["DCM", "HCM", "MINF", "NOR", "RV"])
    split = split_cases(cases, [70, 10, 20], 0, stratify="group")
    group = {c["id"]: c["group"] for c in cases}
    for part, n in (("train", 14), ("val", 2), ("test", 4)):
        assert Counter(group[i] for i in split[part]) == {g: n for g in ("DCM", "HCM", "MINF", "NOR", "RV")}
    # uneven strata: the part sizes stay exact
    cases = _cases(335, groups=["HGG"] * 259 + ["LGG"] * 76)
    split = split_cases(cases, [235, 35, 65], 0, stratify="group")
    assert [len(split[p]) for p in ("train", "val", "test")] == [235, 35, 65]


def test_leave_one_out():
    cases = [{"id": s} for s in ("1", "14", "148", "4", "5", "7", "070")]
    folds = [leave_one_out(cases, k) for k in range(7)]
    assert sorted(f["test"][0] for f in folds) == sorted(c["id"] for c in cases)
    assert folds[0] == {"train": ["14", "148", "4", "5", "7"], "val": ["1"], "test": ["070"]}
    with pytest.raises(ValueError, match=r"fold must be in \[0, 6\]"):
        leave_one_out(cases, 7)


def test_a_split_file_overrides_the_dataset_split(tmp_path):
    from pipeline.config import load_config
    from pipeline.data.prepare import prepare_data
    from tests.datasets_helpers import TINY, write_tiny

    root = write_tiny("hippocampus", tmp_path / "data")
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"train": ["hippocampus_003"], "val": ["hippocampus_002"], "test": ["hippocampus_001"]}))
    parser = load_config("hippocampus", overrides={"data_dir": str(root), "split_file": str(f),
                                                   **TINY["hippocampus"]["over"]})
    data = prepare_data(parser)
    assert data.split["test"] == ["hippocampus_001"] and data.split_origin == f"split file {f}"
    assert [c["id"] for c in data.cases["train"]] == ["hippocampus_003"]
