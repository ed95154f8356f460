"""Demo samples: written atomically in the official layout, never over real data, plausible values, enough cases."""

import json

import nibabel as nib
import numpy as np
import pytest

import pipeline.data.demo
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data.demo import MARKER, source_class, write_demo_data
from pipeline.data.splits import allocate
from tests.datasets_helpers import TINY, write_tiny

DATASETS = sorted(TINY)


@pytest.mark.parametrize("name", DATASETS)
def test_default_demo_size_fills_every_split(name):
    cls = source_class(name)
    counts = load_config(name)["dataset"]["source"]["split_counts"]
    assert min(allocate(cls.demo_cases, counts)) >= 1, (cls.demo_cases, counts)


def test_default_folder_marker_and_replacement(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline.data.demo, "REPO_ROOT", tmp_path)
    dest = write_demo_data("hippocampus", n_cases=3, shape=(8, 8, 8))
    assert dest == tmp_path / "data" / "demo" / "hippocampus"
    info = json.loads((dest / MARKER).read_text())
    assert info["dataset"] == "hippocampus" and info["n_cases"] == 3
    write_demo_data("hippocampus", n_cases=4, shape=(8, 8, 8))  # a demo folder is replaced
    assert len(list((dest / "Task04_Hippocampus" / "imagesTr").iterdir())) == 4
    assert sorted(p.name for p in dest.parent.iterdir()) == ["hippocampus"]  # no temporary folders left


def test_never_overwrites_a_folder_that_is_not_a_demo(tmp_path):
    real = tmp_path / "ACDC"
    real.mkdir()
    (real / "keep.txt").write_text("real data")
    with pytest.raises(FileExistsError, match="is not a demo folder"):
        write_demo_data("acdc", real, n_cases=2, shape=(8, 8, 2))
    assert [p.name for p in real.iterdir()] == ["keep.txt"]


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    cls = source_class("flare")

    def broken(root, **kwargs):
        (root / "TrainingImg").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(cls, "write_demo", staticmethod(broken))
    with pytest.raises(KeyboardInterrupt):
        write_demo_data("flare", tmp_path / "flare")
    assert list(tmp_path.iterdir()) == []


def test_demo_data_command(tmp_path, capsys):
    dest = tmp_path / "h"
    assert main(["demo-data", "--dataset", "hippocampus", "--data-dir", str(dest), "--cases", "2",
                 "--shape", "8,8,8"]) == 0
    assert f"make train DATASET=hippocampus DATA_DIR={dest}" in capsys.readouterr().out
    assert main(["demo-data", "--dataset", "mni", "--data-dir", str(tmp_path / "m")]) == 2
    assert "cannot write demo data" in capsys.readouterr().err
    assert main(["demo-data", "--dataset", "acdcc"]) == 2
    assert "Did you mean 'acdc'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_tiny(name, root / name) for name in ("flare", "brats", "acdc")}


def test_flare_demo_is_ct_in_hounsfield_units(tiny):
    img = nib.load(next(tiny["flare"].rglob("train_000_0000.nii.gz")))
    hu = np.asarray(img.dataobj)
    label = np.asarray(nib.load(next(tiny["flare"].rglob("train_000.nii.gz"))).dataobj)
    assert img.get_data_dtype() == np.int16 and hu.min() < -900                 # air
    for organ in (1, 2, 3, 4):
        assert 40 < hu[label == organ].mean() < 250, organ                       # enhanced soft tissue
    assert np.allclose(np.diag(img.affine)[:3], [-400 / 24, -400 / 24, 240 / 8])  # LPS-style axes


def test_brats_demo_regions_show_differently_per_modality(tiny):
    case = next(tiny["brats"].rglob("BraTS19_DEMO_001_1"))
    seg = np.asarray(nib.load(case / "BraTS19_DEMO_001_1_seg.nii.gz").dataobj)
    mean = {m: {k: np.asarray(nib.load(case / f"BraTS19_DEMO_001_1_{m}.nii.gz").dataobj)[seg == k].mean()
                for k in (1, 2, 4)} for m in ("flair", "t1ce")}
    assert set(np.unique(seg)) == {0, 1, 2, 4}
    assert mean["t1ce"][4] > mean["t1ce"][2] > mean["t1ce"][1]                   # enhancing rim bright in T1ce
    assert mean["flair"][2] > mean["flair"][1]                                   # edema bright in FLAIR


def test_acdc_demo_info_cfg_and_frames(tiny):
    patient = tiny["acdc"] / "training" / "patient001"
    info = dict(line.split(": ") for line in (patient / "Info.cfg").read_text().splitlines())
    assert info["ED"] == "1" and info["Group"] in ("DCM", "HCM", "MINF", "NOR", "RV")
    four_d = nib.load(patient / "patient001_4d.nii.gz")
    assert four_d.shape[3] == int(info["NbFrame"])
    ed = np.asarray(nib.load(patient / "patient001_frame01_gt.nii.gz").dataobj)
    es = np.asarray(nib.load(patient / f"patient001_frame{int(info['ES']):02d}_gt.nii.gz").dataobj)
    assert set(np.unique(ed)) == {0, 1, 2, 3} and (es == 3).sum() < (ed == 3).sum()  # the LV contracts
