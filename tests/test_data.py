import json

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.data.loading import SliceDataset
from pipeline.data.mni import CLASS_NAMES, MNI152Slabs, slab_layout
from pipeline.data.sources import load_split_file


def test_slab_layout_with_gaps_and_cyclic_roles():
    assert slab_layout(17, 5, 1, ["train", "test"]) == [(0, 5, "train"), (6, 11, "test"), (12, 17, "train")]
    with pytest.raises(ValueError, match="roles must be"):
        slab_layout(10, 2, 1, ["trian"])


@pytest.fixture(scope="module")
def mni(tmp_path_factory):
    src = MNI152Slabs(tmp_path_factory.mktemp("mni") / "mni")
    return src, src.cases()


def test_mni_slabs_are_disjoint_with_gaps_and_every_split_is_filled(mni):
    src, cases = mni
    split = src.split(cases, seed=0)
    assert len(split["train"]) == 8 and len(split["val"]) == 2 and len(split["test"]) == 3
    spans = sorted(tuple(c["z"]) for c in cases)
    assert all(b[0] - a[1] >= 1 for a, b in zip(spans, spans[1:]))  # at least one unused slice between slabs


def test_mni_labels_probs_and_affine(mni):
    src, cases = mni
    case = next(c for c in cases if c["role"] == "test")
    image, label, probs = (nib.load(case[k]) for k in ("image", "label", "probs"))
    assert image.shape == (80, 96, 5) and probs.shape == (80, 96, 5, 4)
    lab, p = np.asarray(label.dataobj), probs.get_fdata()
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(p.argmax(-1), lab)
    assert 0.0 <= image.get_fdata().min() and image.get_fdata().max() <= 1.0
    # the slab's first voxel sits where the template's voxel (x0, y0, z0) is
    assert np.allclose(np.diag(image.affine)[:3], 2.0)
    assert image.affine[2, 3] == pytest.approx(-72.0 + 2.0 * case["z"][0])
    # mean T1 per class orders CSF < GM < WM
    t1 = image.get_fdata()
    means = [t1[lab == k].mean() for k in (1, 2, 3)]
    assert means == sorted(means), (CLASS_NAMES, means)


def test_mni_preparation_is_cached_and_redone_when_parameters_change(mni, tmp_path):
    src, cases = mni
    manifest = src.root / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert MNI152Slabs(src.root).cases() == cases
    assert manifest.stat().st_mtime_ns == before
    other = MNI152Slabs(tmp_path / "mni", slab=4, gap=2)
    assert json.loads((other.root / "manifest.json").read_text() if other.cases() else "{}")["params"]["slab"] == 4


def test_split_file_is_checked(tmp_path):
    cases = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"train": ["a"], "val": [], "test": ["b"]}))
    assert load_split_file(f, cases)["test"] == ["b"]
    f.write_text(json.dumps({"train": ["a", "x"], "val": [], "test": ["b"]}))
    with pytest.raises(ValueError, match="case 'x' in 'train' is not in the dataset"):
        load_split_file(f, cases)
    f.write_text(json.dumps({"train": ["a"], "val": ["a"], "test": ["b"]}))
    with pytest.raises(ValueError, match="'a' is in both 'train' and 'val'"):
        load_split_file(f, cases)
    with pytest.raises(FileNotFoundError, match="split file not found"):
        load_split_file(tmp_path / "nope.json", cases)


def test_slice_dataset_takes_slices_along_the_axis_and_can_skip_empty():
    label = torch.zeros(1, 4, 3, 5)
    label[0, :, :, 2] = 1
    vols = [{"id": "v", "image": torch.arange(60.0).reshape(1, 4, 3, 5), "label": label}]
    ds = SliceDataset(vols, slice_axis=2)
    assert len(ds) == 5
    item = ds[3]
    assert item["image"].shape == (1, 4, 3) and torch.equal(item["image"], vols[0]["image"][..., 3])
    assert type(item["image"]) is torch.Tensor and item["slice"] == 3
    assert [ds_i["slice"] for ds_i in SliceDataset(vols, 2, skip_empty=True)] == [2]
    assert len(SliceDataset(vols, slice_axis=0)) == 4
