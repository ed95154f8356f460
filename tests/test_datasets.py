"""The seven benchmarks: each read from a tiny sample in its official layout, prepared, split, and trained and
evaluated for one epoch in-process."""

import json

import mlflow
import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.data.prepare import prepare_data
from pipeline.data.sources import DatasetNotFoundError
from pipeline.training import run_training
from tests.datasets_helpers import TINY, write_tiny
from tests.helpers import tiny_unet_overrides

DATASETS = sorted(TINY)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("samples")
    out = {name: write_tiny(name, root / name) for name in DATASETS}
    out["promise12"] = write_tiny("promise", root / "promise12", layout="promise12")
    return out


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlruns.db")
    yield
    mp.undo()


def _parser(name, data_dir, **extra):
    dataset = "promise" if name == "promise12" else name
    return load_config(dataset, "ce", "unet", overrides={"data_dir": str(data_dir), **TINY[dataset]["over"], **extra})


# what each reader must find in its tiny sample: (number of cases, example id, file label values after mapping)
EXPECTED = {
    "acdc": (6, "patient001_frame01", {0, 1, 2, 3}),
    "brats": (3, "BraTS19_DEMO_001_1", {0, 1, 2, 3}),
    "mrbrains": (3, "1", {0, 1, 2, 3}),
    "flare": (3, "train_000", {0, 1, 2, 3, 4}),
    "promise": (3, "prostate_00", {0, 1, 2}),
    "promise12": (3, "Case00", {0, 1}),
    "hippocampus": (3, "hippocampus_001", {0, 1, 2}),
    "busi": (3, "benign (1)", {0, 1}),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reader_preparation_and_split(samples, name):
    parser = _parser(name, samples[name])
    dataset = parser.get_parsed_content("dataset")
    source = dataset["source"]
    cases = source.cases()
    n, example, values = EXPECTED[name]
    assert len(cases) == n and example in [c["id"] for c in cases]
    assert source.validate(cases) == []

    split = source.split(cases, seed=0)
    assert split == source.split(cases, seed=0)  # deterministic
    assert all(split[p] for p in ("train", "val", "test"))
    assert sorted(i for ids in split.values() for i in ids) == sorted(c["id"] for c in cases)

    data = prepare_data(parser)
    vol = data.volumes["train"][0]
    k = len(dataset["class_names"])
    assert vol["image"].shape[0] == dataset["in_channels"]
    assert vol["image"].shape[1:] == vol["label"].shape[1:] and vol["label"].shape[0] == 1
    assert 0.0 <= float(vol["image"].min()) and float(vol["image"].max()) <= 1.0 + 1e-6
    labels = set()
    for part in data.volumes.values():
        for i in range(len(part)):
            labels |= set(torch.unique(part[i]["label"]).int().tolist())
    assert labels <= set(range(k)) and labels == values
    size = TINY["promise" if name == "promise12" else name]["over"]["dataset::spatial_size"]
    assert [s for s in vol["image"].shape[1:3]] == size[:2]
    assert len(vol["label"].pixdim) == 3 and all(float(s) > 0 for s in vol["label"].pixdim)


def test_acdc_keeps_both_frames_of_a_patient_in_one_split_and_reads_info_cfg(samples):
    source = _parser("acdc", samples["acdc"]).get_parsed_content("dataset")["source"]
    cases = source.cases()
    assert {c["phase"] for c in cases} == {"ED", "ES"} and all(c["group"] for c in cases)
    split = source.split(cases, 0)
    part_of = {i: p for p, ids in split.items() for i in ids}
    for c in cases:
        assert part_of[c["id"]] == part_of[f"{c['subject']}_frame01"]


def test_brats_stacks_modalities_in_order_and_maps_label_4(samples):
    parser = _parser("brats", samples["brats"])
    case = parser.get_parsed_content("dataset")["source"].cases()[0]
    assert [p.rsplit("_", 1)[1] for p in case["image"]] == ["flair.nii.gz", "t1.nii.gz", "t1ce.nii.gz", "t2.nii.gz"]
    import nibabel as nib

    raw = np.asarray(nib.load(case["label"]).dataobj)
    assert 4 in raw and 3 not in raw
    regions = parser.get_parsed_content("dataset")["eval_regions"]
    assert regions == {"ET": [3], "TC": [1, 3], "WT": [1, 2, 3]}


def test_promise12_mhd_is_read_by_itk_in_x_y_z_order(samples):
    from monai.data import ITKReader
    from monai.transforms import LoadImage

    from pipeline.data.validation import read_mhd_array

    case = _parser("promise12", samples["promise12"]).get_parsed_content("dataset")["source"].cases()[0]
    via_itk = LoadImage(reader=ITKReader(), image_only=True)(case["image"])
    own = read_mhd_array(case["image"])
    assert tuple(via_itk.shape) == own.shape == TINY["promise"]["shape"]
    np.testing.assert_array_equal(via_itk.numpy(), own)
    np.testing.assert_allclose(via_itk.pixdim.numpy(), [160 / 24, 160 / 24, 57.6 / 6], rtol=1e-5)


def test_busi_orientation_merges_masks_and_drops_normal(samples, tmp_path):
    from PIL import Image

    parser = _parser("busi", samples["busi"], **{"dataset::spatial_size": [40, 32]})
    source = parser.get_parsed_content("dataset")["source"]
    cases = source.cases()
    assert {c["class"] for c in cases} == {"benign", "malignant"}  # normal/ exists but is not read
    # a case with two masks: the label is their union, and [x, y] indexing is the PNG transposed
    case = dict(cases[0])
    png = np.asarray(Image.open(case["label"][0]))
    h, w = png.shape
    extra = np.zeros_like(png)
    extra[:3, :4] = 255                                          # top-left corner: rows 0-2, columns 0-3
    Image.fromarray(extra).save(tmp_path / "second_mask_1.png")
    case["label"] = [case["label"][0], str(tmp_path / "second_mask_1.png")]
    from monai.transforms import Compose

    out = Compose(parser.get_parsed_content("preprocess"))(case)
    label = out["label"][0, :, :, 0].numpy()
    assert label.shape == (w, h)                                  # x (width) first
    np.testing.assert_array_equal(label, ((png > 127) | (extra > 127)).T.astype(float))
    assert out["image"].shape == (1, w, h, 1)


def test_missing_data_error_names_folder_layout_source_and_demo_command(tmp_path):
    for name in DATASETS:
        empty = tmp_path / name
        empty.mkdir()
        source = load_config(name, overrides={"data_dir": str(empty)}).get_parsed_content("dataset")["source"]
        with pytest.raises(DatasetNotFoundError) as err:
            source.cases()
        msg = str(err.value)
        assert str(empty) in msg and "Expected layout" in msg and "published at" in msg, name
        assert f"make demo-data DATASET={name}" in msg
        assert list(empty.iterdir()) == []  # nothing created


@pytest.mark.parametrize("name", DATASETS)
def test_one_epoch_of_training_and_evaluation(samples, tracking, tmp_path, name):
    parser = _parser(name, samples[name], output_dir=str(tmp_path / "runs"), epochs=1, val_interval=1,
                     **tiny_unet_overrides())
    out = run_training(parser, run_name=f"tiny-{name}", quiet=True)
    results = out["results"]
    source = parser.get_parsed_content("dataset")["source"]
    split = source.split(source.cases(), 0)
    assert json.loads((out["run_dir"] / "splits.json").read_text()) == split
    assert results["n_volumes"] == len(split["test"])
    assert 0.0 <= results["mean"]["dsc"] <= 1.0 and 0.0 <= results["mean"]["ece"] <= 1.0
    run = mlflow.MlflowClient().get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["split"] == "dataset (seed 0)" and run.data.params["cache"] == "memory"
    assert run.data.params["n_test_volumes"] == str(len(split["test"]))
    assert "splits.json" in {a.path for a in mlflow.MlflowClient().list_artifacts(out["run_id"])}
    if name == "brats":  # DSC/ASD on the evaluation regions, calibration on the training classes
        assert results["region_names"] == ["ET", "TC", "WT"]
        assert all(0.0 <= results["per_class"][r]["dsc"] <= 1.0 for r in ("ET", "TC", "WT"))
        assert "WT" in out["table"] and "test/dsc/WT" in run.data.metrics
    # surface distances in mm, or in pixels where the images carry no spacing (BUSI's PNGs)
    unit = "px" if name == "busi" else "mm"
    assert f"ASD({unit})" in out["table"] and f"ASD ({unit})" in (out["run_dir"] / "summary.md").read_text()
