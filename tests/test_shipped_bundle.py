"""The shipped bundle (``bundles/mni_brain_tissue_mbls_unet``) as a stranger uses it: copied out of the repository
and run with ``python -I`` and MONAI alone (``tests/bundle_recipient.py``), on the cases it ships in ``data/``.

Inference on its sample cases, evaluation reproducing the DSC, foreground ECE and CECE of its metadata (the model
card's table), retraining with ``--epochs 2`` whose weights inference then uses, the bad inputs of a real
scanner's files (×1000 intensities refused, a 1 mm grid resampled to the 2 mm of training and back), and the
model zoo's checks (:func:`pipeline.export.verify_bundle` with the bundle's code trusted).
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.export import BUNDLES_DIR, SCHEMA_FILE, verify_bundle

SHIPPED = BUNDLES_DIR / "mni_brain_tissue_mbls_unet"
RECIPIENT = Path(__file__).resolve().parent / "bundle_recipient.py"


def _jobs(b: Path, work: Path) -> list[dict]:
    def infer(name, **more):
        return {"name": name, "config_file": [str(b / "configs" / "inference.json")],
                "overrides": {"bundle_root": str(b), "output_dir": str(work / name), **more}}

    retrained = work / "retrained"
    return [
        infer("infer"),
        {"name": "evaluate", "config_file": [str(b / "configs" / "evaluate.json")],
         "overrides": {"bundle_root": str(b), "output_dir": str(work / "evaluate")}},
        {"name": "train", "config_file": [str(b / "configs" / "train.json")],
         "overrides": {"bundle_root": str(b), "epochs": 2, "ckpt_dir": str(retrained),
                       "output_dir": str(work / "train_out")}},
        {"name": "export_retrained", "kind": "ckpt_export", "config_file": str(b / "configs" / "train.json"),
         "overrides": {"net_id": "network_def", "filepath": str(retrained / "model.ts"), "bundle_root": str(b),
                       "ckpt_file": str(retrained / "model.pt"), "meta_file": str(b / "configs" / "metadata.json")}},
        {**infer("infer_retrained", model_file=str(retrained / "model.ts")),
         "sha256_of": {"model_sha256": str(retrained / "model.ts")}},
        # the model zoo's habits: evaluate.json layered on train.json, verify_torchscript's ckpt_export
        {"name": "evaluate_on_train", "config_file": [str(b / "configs" / f) for f in ("train.json", "evaluate.json")],
         "overrides": {"bundle_root": str(b), "output_dir": str(work / "evaluate_on_train")}},
        {"name": "zoo_torchscript", "kind": "ckpt_export", "config_file": str(b / "configs" / "inference.json"),
         "overrides": {"net_id": "network_def", "filepath": str(work / "zoo.ts"), "bundle_root": str(b),
                       "ckpt_file": str(b / "models" / "model.pt"), "meta_file": str(b / "configs" / "metadata.json")}},
        infer("x1000", dataset_dir=str(work / "bad" / "x1000")),
        infer("fine", dataset_dir=str(work / "bad" / "fine")),
    ]


def _bad_inputs(sample: Path, dest: Path) -> None:
    image = nib.load(sample)
    data = np.asarray(image.dataobj, dtype=np.float32)
    (dest / "x1000" / "imagesTs").mkdir(parents=True)
    nib.save(nib.Nifti1Image(data * 1000, image.affine), dest / "x1000" / "imagesTs" / sample.name)
    fine = data
    for axis in range(3):  # twice as fine, linear, sharing the first voxel centre: every second voxel is the sample's
        a = np.moveaxis(fine, axis, 0)
        out = np.empty((2 * a.shape[0] - 1, *a.shape[1:]), dtype=np.float32)
        out[0::2], out[1::2] = a, (a[:-1] + a[1:]) / 2
        fine = np.moveaxis(out, 0, axis)
    affine = image.affine.copy()
    affine[:3, :3] /= 2
    (dest / "fine" / "imagesTs").mkdir(parents=True)
    nib.save(nib.Nifti1Image(fine, affine), dest / "fine" / "imagesTs" / sample.name)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    work = tmp_path_factory.mktemp("stranger")
    bundle = shutil.copytree(SHIPPED, work / "bundle", ignore=shutil.ignore_patterns("eval", "retrained"))
    samples = sorted((bundle / "data" / "imagesTs").glob("*.nii.gz"))
    assert samples, "the shipped bundle has no sample case in data/imagesTs"
    _bad_inputs(samples[0], work / "bad")
    (work / "jobs.json").write_text(json.dumps(_jobs(bundle, work)))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1"}
    with open(work / "recipient.log", "w") as log:
        subprocess.run([sys.executable, "-I", str(RECIPIENT), str(work / "jobs.json"), str(work / "results.json")],
                       cwd=work / "bundle",
                       env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900, check=False)
    assert (work / "results.json").is_file(), (work / "recipient.log").read_text()[-3000:]
    return {"work": work, "bundle": bundle, "samples": samples,
            "results": json.loads((work / "results.json").read_text())}


def _ok(shipped, name):
    job = shipped["results"]["jobs"][name]
    assert job["ok"], f"{name}: {job['error']}"


def test_inference_on_the_sample_cases(shipped):
    assert shipped["results"]["pipeline_importable"] is False
    _ok(shipped, "infer")
    for sample in shipped["samples"]:
        stem = sample.name[: -len(".nii.gz")]
        prob = np.asarray(nib.load(shipped["work"] / "infer" / f"{stem}_prob.nii.gz").dataobj, dtype=np.float64)
        np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("job", ["evaluate", "evaluate_on_train"])
def test_evaluation_reproduces_the_cards_metrics(shipped, job):
    _ok(shipped, job)
    rows = dict(csv.reader(open(shipped["work"] / job / "metrics.csv")))
    meta = json.loads((shipped["bundle"] / "configs" / "metadata.json").read_text())
    card = (shipped["bundle"] / "docs" / "README.md").read_text()
    for metric, key in (("test_mean_dice", "dsc"), ("test_foreground_ece", "ece"), ("test_cece", "cece")):
        assert float(rows[metric]) == pytest.approx(meta["eval_metrics"][key], abs=2e-4), metric
        assert f"{meta['eval_metrics'][key]:.4f}" in card
    header = open(shipped["work"] / job / "test_mean_dice_raw.csv").readline().strip()
    assert header == "filename,CSF,GM,WM,mean"  # class names, not class0


def test_retraining_for_two_epochs_gives_weights_that_inference_uses(shipped):
    for name in ("train", "export_retrained", "infer_retrained"):
        _ok(shipped, name)
    stem = shipped["samples"][0].name[: -len(".nii.gz")]
    retrained = np.asarray(nib.load(shipped["work"] / "infer_retrained" / f"{stem}_prob.nii.gz").dataobj)
    original = np.asarray(nib.load(shipped["work"] / "infer" / f"{stem}_prob.nii.gz").dataobj)
    assert retrained.shape == original.shape and np.abs(retrained - original).max() > 0.05  # another network


def test_scanner_intensities_are_refused_and_a_finer_grid_is_resampled(shipped):
    job = shipped["results"]["jobs"]["x1000"]
    sample = shipped["samples"][0]
    assert not job["ok"] and str(shipped["work"] / "bad" / "x1000" / "imagesTs" / sample.name) in job["error"]
    assert "intensities from" in job["error"] and "expected within" in job["error"]
    _ok(shipped, "fine")
    stem = sample.name[: -len(".nii.gz")]
    original = nib.load(shipped["work"] / "infer" / f"{stem}_prob.nii.gz")
    fine = nib.load(shipped["work"] / "fine" / f"{stem}_prob.nii.gz")
    np.testing.assert_allclose(fine.header.get_zooms()[:3], np.array(original.header.get_zooms()[:3]) / 2)
    ref = np.asarray(original.dataobj)
    got = np.asarray(fine.dataobj)[::2, ::2, ::2]
    np.testing.assert_allclose(got.reshape(ref.shape), ref, atol=1e-4)


def test_the_model_zoo_checks_pass(shipped):
    _ok(shipped, "zoo_torchscript")  # under python -I, outside the repository
    lines = []
    results = verify_bundle(shipped["bundle"], SCHEMA_FILE, say=lines.append, trust_code=True)
    assert [name for name, ok, _ in results if ok is not True] == [], lines
