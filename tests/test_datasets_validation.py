"""Validation before training: one test per kind of problem, every problem reported at once, tolerance for the
ways real archives vary, and images with NaN stopped while caching."""

import gzip
import shutil

import nibabel as nib
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.data.prepare import prepare_data
from pipeline.data.sources import InvalidDatasetError
from pipeline.data.validation import check_case, read_header, unique_values
from tests.datasets_helpers import TINY, write_tiny


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return {
        "hippocampus": write_tiny("hippocampus", root / "hippocampus"),
        "brats": write_tiny("brats", root / "brats"),
        "promise": write_tiny("promise", root / "promise"),
        "promise12": write_tiny("promise", root / "promise12", layout="promise12"),
        "busi": write_tiny("busi", root / "busi"),
    }


def _copy(pristine, name, tmp_path):
    dest = tmp_path / name
    shutil.copytree(pristine[name], dest)
    return dest


def _problems(name, root):
    dataset = "promise" if name == "promise12" else name
    source = load_config(dataset, overrides={"data_dir": str(root)}).get_parsed_content("dataset")["source"]
    return source.validate(source.cases())


def _hippo(root, kind, i=1):
    return root / "Task04_Hippocampus" / kind / f"hippocampus_{i:03d}.nii.gz"


def test_demo_samples_are_valid(pristine):
    for name in pristine:
        assert _problems(name, pristine[name]) == [], name


def test_image_without_label(pristine, tmp_path):
    root = _copy(pristine, "hippocampus", tmp_path)
    _hippo(root, "labelsTr", 2).unlink()
    (p,) = _problems("hippocampus", root)
    assert p == ("case hippocampus_002: image without its label (expected "
                 "Task04_Hippocampus/labelsTr/hippocampus_002.nii.gz)")


def test_label_without_image(pristine, tmp_path):
    root = _copy(pristine, "hippocampus", tmp_path)
    _hippo(root, "imagesTr", 3).unlink()
    (p,) = _problems("hippocampus", root)
    assert p.startswith("case hippocampus_003: label without its image (expected ")


def test_truncated_nifti_gz(pristine, tmp_path):
    root = _copy(pristine, "hippocampus", tmp_path)
    f = _hippo(root, "imagesTr", 1)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    (p,) = _problems("hippocampus", root)
    assert p.startswith("case hippocampus_001: Task04_Hippocampus/imagesTr/hippocampus_001.nii.gz: truncated")


def test_truncated_uncompressed_nifti(tmp_path):
    img = nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4))
    nib.save(img, tmp_path / "a.nii")
    data = (tmp_path / "a.nii").read_bytes()
    (tmp_path / "a.nii").write_bytes(data[:-100])
    with pytest.raises(Exception, match=r"truncated: \d+ bytes, the header needs 1376"):
        read_header(tmp_path / "a.nii")


def test_gzip_trailer_mismatch_is_confirmed_by_decompressing(tmp_path):
    """A complete file whose gzip trailer disagrees (here: two gzip members) is accepted after a full check."""
    img = nib.Nifti1Image(np.arange(512, dtype=np.float32).reshape(8, 8, 8), np.eye(4))
    raw = img.to_bytes()
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(raw[:300]) + gzip.compress(raw[300:]))
    assert read_header(tmp_path / "two.nii.gz").shape == (8, 8, 8)


def test_unreadable_file(pristine, tmp_path):
    root = _copy(pristine, "hippocampus", tmp_path)
    _hippo(root, "labelsTr", 1).write_bytes(b"this is not a NIfTI file at all" * 20)
    (p,) = _problems("hippocampus", root)
    assert p.startswith("case hippocampus_001: Task04_Hippocampus/labelsTr/hippocampus_001.nii.gz: unreadable")


def test_shape_mismatch(pristine, tmp_path):
    root = _copy(pristine, "hippocampus", tmp_path)
    f = _hippo(root, "labelsTr", 2)
    ref = nib.load(f)
    nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.uint8), ref.affine), f)
    (p,) = _problems("hippocampus", root)
    assert "labelsTr/hippocampus_002.nii.gz has shape (5, 6, 7)" in p and "has (12, 16, 10)" in p


def test_affine_mismatch(pristine, tmp_path):
    root = _copy(pristine, "hippocampus", tmp_path)
    f = _hippo(root, "labelsTr", 2)
    ref = nib.load(f)
    shifted = ref.affine.copy()
    shifted[0, 3] += 2.5
    nib.save(nib.Nifti1Image(np.asarray(ref.dataobj), shifted), f)
    (p,) = _problems("hippocampus", root)
    assert "different affines" in p and "up to 2.5 mm" in p and p.startswith("case hippocampus_002")


def test_label_values_outside_the_set(pristine, tmp_path):
    root = _copy(pristine, "hippocampus", tmp_path)
    f = _hippo(root, "labelsTr", 3)
    ref = nib.load(f)
    lab = np.asarray(ref.dataobj).copy()
    lab[0, 0, 0], lab[1, 0, 0] = 7, 9
    nib.save(nib.Nifti1Image(lab, ref.affine), f)
    (p,) = _problems("hippocampus", root)
    assert p.endswith("holds label values [7, 9] outside the dataset's [0, 1, 2]")


def test_missing_modality(pristine, tmp_path):
    root = _copy(pristine, "brats", tmp_path)
    (f,) = root.rglob("BraTS19_DEMO_002_1_t1ce.nii.gz")
    f.unlink()
    problems = _problems("brats", root)
    assert problems == [f"case BraTS19_DEMO_002_1: missing modality (expected {f.relative_to(root)})"]


def test_wrong_number_of_channels_in_a_4d_image(pristine, tmp_path):
    root = _copy(pristine, "promise", tmp_path)
    f = root / "Task05_Prostate" / "imagesTr" / "prostate_01.nii.gz"
    ref = nib.load(f)
    nib.save(nib.Nifti1Image(np.asarray(ref.dataobj)[..., :1], ref.affine), f)
    (p,) = _problems("promise", root)
    assert p.startswith("case prostate_01: 1 image channel(s) in") and p.endswith("expected 2 (one per modality)")


def test_truncated_raw_of_a_metaimage(pristine, tmp_path):
    root = _copy(pristine, "promise12", tmp_path)
    (raw,) = root.rglob("Case01_segmentation.raw")
    raw.write_bytes(raw.read_bytes()[:100])
    (p,) = _problems("promise12", root)
    assert "Case01_segmentation.mhd: truncated: Case01_segmentation.raw holds 100 bytes" in p


def test_truncated_png(pristine, tmp_path):
    root = _copy(pristine, "busi", tmp_path)
    (f,) = root.rglob("malignant (1).png")
    f.write_bytes(f.read_bytes()[:200])
    (p,) = _problems("busi", root)
    assert p.startswith("case malignant (1): Dataset_BUSI_with_GT/malignant/malignant (1).png: unreadable or truncated")


def test_every_problem_is_reported_at_once_and_nothing_is_prepared(pristine, tmp_path):
    root = _copy(pristine, "hippocampus", tmp_path)
    _hippo(root, "labelsTr", 1).unlink()
    _hippo(root, "imagesTr", 2).unlink()
    f = _hippo(root, "labelsTr", 3)
    f.write_bytes(f.read_bytes()[:50])
    parser = load_config("hippocampus", overrides={"data_dir": str(root), "output_dir": str(tmp_path / "runs"),
                                                   **TINY["hippocampus"]["over"]})
    with pytest.raises(InvalidDatasetError) as err:
        prepare_data(parser)
    msg = str(err.value)
    assert msg.startswith("3 problem(s) in the hippocampus dataset")
    for cid in ("hippocampus_001", "hippocampus_002", "hippocampus_003"):
        assert f"case {cid}:" in msg
    assert not (tmp_path / "runs").exists()


def test_tolerates_nii_upper_case_extra_files_and_a_parent_folder(pristine, tmp_path):
    root = _copy(pristine, "hippocampus", tmp_path)
    task = root / "Task04_Hippocampus"
    # one image stored uncompressed, one label in upper case, macOS and extra files beside them
    img = nib.load(_hippo(root, "imagesTr", 1))
    nib.save(img, task / "imagesTr" / "hippocampus_001.nii")
    _hippo(root, "imagesTr", 1).unlink()
    _hippo(root, "labelsTr", 2).rename(task / "labelsTr" / "HIPPOCAMPUS_002.NII.GZ")
    (task / "imagesTr" / "._hippocampus_003.nii.gz").write_bytes(b"\0" * 10)
    (task / "README.txt").write_text("extra")
    (task / "imagesTs" / "hippocampus_999.nii.gz").write_bytes(b"not read")
    source = load_config("hippocampus", overrides={"data_dir": str(tmp_path)}).get_parsed_content("dataset")["source"]
    cases = source.cases()  # DATA_DIR one level above the task folder
    assert [c["id"] for c in cases] == ["hippocampus_001", "hippocampus_002", "hippocampus_003"]
    assert cases[0]["image"].endswith("hippocampus_001.nii") and cases[1]["label"].endswith(".NII.GZ")
    assert source.validate(cases) == []


def test_check_case_handles_masks_lists_and_no_files(tmp_path):
    case = {"id": "x", "image": str(tmp_path / "a.nii.gz"), "label": str(tmp_path / "b.nii.gz")}
    assert check_case(case, 1, [0, 1]) == [f"case x: neither image nor label found (expected {tmp_path}/a.nii.gz)"]
    assert check_case({"id": "y", "image": [], "label": "z"}, 1, [0, 1]) == ["case y: no image file listed"]


def test_unique_values_fast_path_agrees_with_numpy():
    rng = np.random.default_rng(0)
    for arr in (rng.integers(0, 5, 1000).astype(np.uint8), rng.integers(-3, 3, 100).astype(np.int16),
                np.array([0.0, 2.0, 2.0, 255.0]), np.array([0.0, 0.5]), np.array([1.0, np.nan])):
        np.testing.assert_array_equal(unique_values(arr), np.unique(arr))


def test_nan_in_an_image_stops_caching_naming_the_case(pristine, tmp_path):
    root = _copy(pristine, "hippocampus", tmp_path)
    f = _hippo(root, "imagesTr", 2)
    ref = nib.load(f)
    arr = np.asarray(ref.dataobj, dtype=np.float32).copy()
    arr[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, ref.affine), f)
    parser = load_config("hippocampus", overrides={"data_dir": str(root), "cache": "memory",
                                                   **TINY["hippocampus"]["over"]})
    with pytest.raises(Exception, match=r"case hippocampus_002: \d+ NaN or infinite value\(s\) in 'image'"):
        prepare_data(parser)


def test_a_complete_nifti_gz_is_checked_from_its_trailer_without_decompressing(pristine, monkeypatch):
    import pipeline.data.validation as validation

    def fail(path):
        raise AssertionError(f"{path} was decompressed")

    monkeypatch.setattr(validation, "_gzip_length", fail)
    assert read_header(_hippo(pristine["hippocampus"], "imagesTr", 1)).shape == (12, 16, 10)


@pytest.mark.parametrize("name", ["hippocampus", "promise"])
@pytest.mark.parametrize("key, bad", [("image", "../../outside/x.nii.gz"), ("label", "/etc/outside.nii.gz"),
                                      ("image", "./imagesTr/../../x.nii.gz"), ("label", 7)])
def test_a_dataset_json_path_outside_the_dataset_folder_is_refused_naming_it(pristine, tmp_path, name, key, bad):
    import json

    root = _copy(pristine, name, tmp_path)
    (listing,) = root.rglob("dataset.json")
    outside = tmp_path / "outside"  # a real volume there: the refusal is not a missing file
    outside.mkdir()
    shutil.copy(next((listing.parent / "imagesTr").iterdir()), outside / "x.nii.gz")
    meta = json.loads(listing.read_text())
    meta["training"][1][key] = bad
    listing.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"{listing}: training\[1\]\.{key} ") as e:
        _problems(name, root)
    assert repr(bad) in str(e.value)
    assert ("outside the dataset folder" if isinstance(bad, str) else "must be a path inside") in str(e.value)


def test_dataset_json_paths_inside_the_folder_are_read(pristine, tmp_path):
    import json

    root = _copy(pristine, "hippocampus", tmp_path)
    (listing,) = root.rglob("dataset.json")
    meta = json.loads(listing.read_text())
    meta["training"][0]["image"] = "imagesTr/sub/../" + meta["training"][0]["image"].split("/")[-1]
    listing.write_text(json.dumps(meta))
    assert _problems("hippocampus", root) == []
