"""A tiny run exported as three bundles (no calibration, TS, LTS), then used as their recipients use them.

The recipient's side runs in one background process started with ``python -I`` from a folder outside the
repository (``pipeline`` cannot be imported there): MONAI's ``run`` for inference on a generated NIfTI, for the
evaluation on the run's test cases and for one epoch of ``train.json``, and for a bundle whose ``model.ts`` has a
flipped byte. The in-process tests run meanwhile; the recipient's results are checked last.
"""

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from pipeline.cli import main
from pipeline.config import REPO_ROOT, load_config
from pipeline.export import (
    SCHEMA_FILE,
    WeightFileError,
    check_large_files,
    export_bundle,
    load_bundle_model,
    load_bundle_weights,
    verify_bundle,
)
from pipeline.export.bundle import auto_calibration
from pipeline.export.scripts import imported_modules
from pipeline.export.verify import main as verify_main
from pipeline.export.verify import summary
from pipeline.posthoc import LocalTemperatureScaling, TemperatureScaling
from pipeline.runs import load_weights
from pipeline.training import run_training
from tests.helpers import make_config_dir, tiny_unet_overrides, write_blob_volumes

CALIBRATIONS = ("none", "ts", "lts")
#: bad inputs of a recipient: the refusal's words, or None where the bundle must fix the input (resample it)
BAD_INPUTS = {"x1000": None, "nan": "NaN or infinite", "channels": "2 channel(s)",
              "flat": "a 2D image", "truncated": "cannot be read as an image", "empty": "no image to segment",
              "fine": None}
RECIPIENT = Path(__file__).resolve().parent / "bundle_recipient.py"
#: the generated input: a test volume of the run under a rotated, shifted affine (the geometry must survive)
INPUT_AFFINE = np.array([[0.0, -1.5, 0.0, 30.0], [1.5, 0.0, 0.0, -12.0], [0.0, 0.0, 3.0, 5.0], [0.0, 0.0, 0.0, 1.0]])


def flip_byte(path: Path, offset_from_end: int = 2000) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def _infer(name: str, root: Path, data: Path, out: Path, **more) -> dict:
    return {"name": name, "config_file": [str(root / "configs" / "inference.json")],
            "overrides": {"bundle_root": str(root), "dataset_dir": str(data), "output_dir": str(out), **more}}


def _recipient_jobs(received: Path, bdata: Path) -> list[dict]:
    jobs = []
    for cal in CALIBRATIONS:
        root = received / f"blobs_{cal}"
        jobs.append(_infer(f"infer_{cal}", root, received / "input", received / f"out_{cal}"))
        jobs.append({"name": f"evaluate_{cal}",
                     "config_file": [str(root / "configs" / f) for f in ("inference.json", "evaluate.json")],
                     "overrides": {"bundle_root": str(root), "dataset_dir": str(bdata),
                                   "output_dir": str(received / f"eval_{cal}")}})
    root = received / "blobs_ts"
    for name, files in (("evaluate_alone", ["evaluate.json"]), ("evaluate_on_train", ["train.json", "evaluate.json"])):
        jobs.append({"name": name, "config_file": [str(root / "configs" / f) for f in files],
                     "overrides": {"bundle_root": str(root), "dataset_dir": str(bdata),
                                   "output_dir": str(received / name)}})
    root = received / "blobs_none"
    # --epochs 2 with the run's val_interval (5): the validation at the last epoch saves the weights
    jobs.append({"name": "train", "config_file": [str(root / "configs" / "train.json")],
                 "overrides": {"bundle_root": str(root), "dataset_dir": str(bdata), "epochs": 2, "val_interval": 5,
                               "ckpt_dir": str(received / "retrained"), "output_dir": str(received / "train_out")}})
    jobs.append({"name": "export_retrained", "kind": "ckpt_export",
                 "config_file": str(root / "configs" / "train.json"),
                 "overrides": {"net_id": "network_def", "filepath": str(received / "retrained" / "model.ts"),
                               "ckpt_file": str(received / "retrained" / "model.pt"), "bundle_root": str(root),
                               "meta_file": str(root / "configs" / "metadata.json")}})
    jobs.append({**_infer("infer_retrained", root, received / "input", received / "out_retrained",
                          model_file=str(received / "retrained" / "model.ts")),
                 "sha256_of": {"model_sha256": str(received / "retrained" / "model.ts")}})
    jobs.append(_infer("infer_retrained_unlisted", root, received / "input", received / "out_unlisted",
                       model_file=str(received / "retrained" / "model.ts")))
    root = received / "tampered"
    jobs.append(_infer("tampered", root, received / "input", received / "out_tampered"))
    for case in BAD_INPUTS:
        jobs.append(_infer(f"bad_{case}", received / "blobs_none", received / "bad" / case,
                           received / "bad_out" / case))
    return jobs


def _write_bad_inputs(source: Path, dest: Path) -> None:
    """One dataset_dir per bad input, from a test volume: ``dest/<case>/imagesTs/``."""
    image = nib.load(source)
    data = np.asarray(image.dataobj, dtype=np.float32)
    spacing = np.array(image.header.get_zooms()[:3], dtype=float)

    def save(case, array, affine=image.affine, name="scan.nii.gz"):
        (dest / case / "imagesTs").mkdir(parents=True)
        nib.save(nib.Nifti1Image(array, affine), dest / case / "imagesTs" / name)

    save("x1000", data * 1000)
    nan = data.copy()
    nan[3, 4, 2] = np.nan
    save("nan", nan)
    save("channels", np.stack([data, data], axis=-1))
    save("flat", data[..., 2])
    save("fine", _refined(data), np.diag([*(spacing / 2), 1.0]))
    save("truncated", data)
    blob = (dest / "truncated" / "imagesTs" / "scan.nii.gz").read_bytes()
    (dest / "truncated" / "imagesTs" / "scan.nii.gz").write_bytes(blob[: len(blob) // 2])
    (dest / "empty" / "imagesTs").mkdir(parents=True)


def _refined(data: np.ndarray) -> np.ndarray:
    """``data`` on a grid twice as fine along every axis, linearly interpolated, sharing its first voxel centre:
    every second voxel is a voxel of ``data``."""
    out = data
    for axis in range(3):
        a = np.moveaxis(out, axis, 0)
        fine = np.empty((2 * a.shape[0] - 1, *a.shape[1:]), dtype=np.float32)
        fine[0::2], fine[1::2] = a, (a[:-1] + a[1:]) / 2
        out = np.moveaxis(fine, 0, axis)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundlerun")
    root = write_blob_volumes(tmp / "data")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{tmp}/mlruns.db"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = {"data_dir": str(root), "output_dir": str(tmp / "runs"), **tiny_unet_overrides(), "epochs": 2,
                 "evaluation::posthoc": ["ts", "lts"], "evaluation::lts::iterations": 4,
                 "evaluation::noise::sigmas": [], "evaluation::maps::volumes": 0, "evaluation::maps::slices": 0}
    out = run_training(load_config("blobs", "mbls", "unet", overrides=overrides, config_dir=make_config_dir(tmp)),
                       run_name="exp", quiet=True)
    bundles = {cal: export_bundle(str(out["run_dir"]), name=f"blobs_{cal}", out_root=tmp / "bundles", calibration=cal,
                                  data_dir=tmp / "bdata" if cal == "none" else None) for cal in CALIBRATIONS}

    # what a recipient gets: copies of the bundles, a NIfTI of their own, and MONAI
    received = tmp_path_factory.mktemp("received")
    for cal, b in bundles.items():
        shutil.copytree(b["bundle"], received / f"blobs_{cal}")
    shutil.copytree(bundles["ts"]["bundle"], received / "tampered")
    flip_byte(received / "tampered" / "models" / "model.ts")
    source = nib.load(root / "images" / "case04.nii.gz")
    (received / "input" / "imagesTs").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), INPUT_AFFINE), received / "input" / "imagesTs" / "scan.nii.gz")
    _write_bad_inputs(root / "images" / "case04.nii.gz", received / "bad")
    (received / "jobs.json").write_text(json.dumps(_recipient_jobs(received, tmp / "bdata")))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(received), "LANG": "C.UTF-8"}
    log = open(received / "recipient.log", "w")
    proc = subprocess.Popen([sys.executable, "-I", str(RECIPIENT), "jobs.json", "results.json"], cwd=received,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    yield {"out": out, "tmp": tmp, "root": root, "uri": uri, "bundles": bundles, "received": received, "proc": proc}
    if proc.poll() is None:
        proc.kill()
    log.close()
    mp.undo()


@pytest.fixture(scope="module")
def recipient(exported):
    proc = exported["proc"]
    proc.wait(timeout=900)
    received = exported["received"]
    assert (received / "results.json").is_file(), (received / "recipient.log").read_text()[-3000:]
    return json.loads((received / "results.json").read_text())


def _network_and_calibrator(exported, cal):
    parser = ConfigParser()
    parser.read_config(str(exported["out"]["run_dir"] / "config.yaml"))
    network = parser.get_parsed_content("network_def").eval()
    load_weights(network, exported["out"]["best_checkpoint"])
    if cal == "none":
        return network, None
    cls = TemperatureScaling if cal == "ts" else LocalTemperatureScaling
    return network, cls.load_calibrator(network, exported["out"]["run_dir"] / "posthoc" / f"{cal}.pt").eval()


def _reference_probabilities(exported, cal) -> np.ndarray:
    """The run's own evaluation of case04: the run's preprocessing (min-max scaling), the network slice by slice,
    the fitted calibrator on the logits volume; ``K×X×Y×Z`` calibrated probabilities."""
    network, calibrator = _network_and_calibrator(exported, cal)
    image = np.asarray(nib.load(exported["root"] / "images" / "case04.nii.gz").dataobj, dtype=np.float32)
    x = torch.from_numpy((image - image.min()) / (image.max() - image.min()))[None, None]
    with torch.no_grad():
        logits = network(x[0].movedim(-1, 0)).movedim(0, -1)[None]  # Z slices C×X×Y → 1×K×X×Y×Z
        if calibrator is not None:
            logits = calibrator.calibrate(logits, x, slice_axis=2)
    return torch.softmax(logits, 1)[0].numpy()


def test_bundle_holds_the_model_zoo_files_and_honest_metadata(exported):
    client = mlflow.MlflowClient(tracking_uri=exported["uri"])
    logged = client.get_run(exported["out"]["run_id"]).data.metrics
    for cal, b in exported["bundles"].items():
        dest = b["bundle"]
        for f in ("configs/inference.json", "configs/evaluate.json", "configs/train.json", "configs/logging.conf",
                  "configs/metadata.json", "configs/datalist.json", "models/model.pt", "models/model.ts",
                  "large_files.yml", "LICENSE", "docs/README.md", "scripts/losses.py", "scripts/padding.py"):
            assert (dest / f).is_file(), f"{cal}: {f}"
        assert b["calibration"] == cal and b["compiled"] == {"none": "none", "ts": "scripted", "lts": "traced"}[cal]
        meta = json.loads((dest / "configs" / "metadata.json").read_text())
        prefix = "test/" if cal == "none" else f"test/{cal}/"
        assert meta["eval_metrics"] == {k: pytest.approx(logged[prefix + k], abs=1e-12)
                                        for k in ("dsc", "asd", "ece", "cece", "nll", "brier")}
        assert {"none": "without post-hoc calibration", "ts": "calibrated with temperature scaling (TS)",
                "lts": "calibrated with local temperature scaling (LTS)"}[cal] in meta["task"]
        outputs = meta["network_data_format"]["outputs"]
        assert outputs["pred"]["format"] == "logits" and outputs["pred"]["value_range"] == []  # what model.ts returns
        assert outputs["probabilities"]["value_range"] == [0, 1] and outputs["pred"]["num_channels"] == 3
        assert outputs["entropy"]["value_range"] == [0, pytest.approx(math.log(3))]
        assert meta["network_data_format"]["inputs"]["image"]["value_range"] == [0.0, 1.0]  # ScaleIntensityd
        # every package the configs and scripts import is listed with its version
        needed = set()
        for f in (dest / "scripts").glob("*.py"):
            needed |= imported_modules(f)
        for f in ("inference", "evaluate", "train"):
            text = (dest / "configs" / f"{f}.json").read_text()
            needed |= {m for m in ("torch", "monai", "numpy", "ignite", "glob", "json", "os", "pathlib")
                       if f"import {m}" in text}
        own = {"torch": "pytorch_version", "monai": "monai_version", "numpy": "numpy_version"}
        dists = {"ignite": "pytorch-ignite"}
        for module in needed - set(sys.stdlib_module_names) - {"__future__"}:
            assert module in own or dists.get(module, module) in meta["required_packages_version"], module
        assert {"nibabel", "pytorch-ignite", "fire"} <= set(meta["required_packages_version"])
        large = json.loads((dest / "large_files.yml").read_text())["large_files"]
        assert [e["path"] for e in large] == ["models/model.pt", "models/model.ts"]
        assert all("url" not in e for e in large)
        assert (dest / "docs" / "data_license.txt").is_file()
        card = (dest / "docs" / "README.md").read_text()
        assert "## Limitations" in card and "## System configuration" in card
        assert {"inputs.py", "evaluation.py", "losses.py"} <= {f.name for f in (dest / "scripts").glob("*.py")}
        assert "pipeline" not in (dest / "configs" / "train.json").read_text()
    datalist = json.loads((exported["bundles"]["none"]["bundle"] / "configs" / "datalist.json").read_text())
    assert [e["image"] for e in datalist["test"]] == ["imagesTs/case04.nii.gz", "imagesTs/case05.nii.gz"]
    assert (exported["tmp"] / "bdata" / "labelsTr" / "case00.nii.gz").is_file()


def test_shipped_model_is_the_runs_network_with_its_calibrator(exported):
    x = torch.rand(3, 1, 21, 17, generator=torch.Generator().manual_seed(3))
    for cal, b in exported["bundles"].items():
        network, calibrator = _network_and_calibrator(exported, cal)
        model = load_bundle_model(b["bundle"])
        weights = load_bundle_weights(b["bundle"])
        assert weights.keys() == network.state_dict().keys()
        assert all(torch.equal(weights[k], v) for k, v in network.state_dict().items())
        with torch.no_grad():
            expected = network(x) if calibrator is None else calibrator(x)
            torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(model.network(x), network(x), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*looks like a TorchScript archive")  # MLflow loads it with torch.load first
def test_mlflow_holds_the_bundle_and_a_registrable_logged_model(exported):
    client = mlflow.MlflowClient(tracking_uri=exported["uri"])
    run = client.get_run(exported["out"]["run_id"])
    assert run.info.status == "FINISHED"
    assert {o.model_id for o in run.outputs.model_outputs} >= {b["mlflow"]["model_id"]
                                                               for b in exported["bundles"].values()}
    files = [f.path for f in client.list_artifacts(run.info.run_id, "bundle/blobs_ts/configs")]
    assert "bundle/blobs_ts/configs/metadata.json" in files
    lts = exported["bundles"]["lts"]
    model = client.get_logged_model(lts["mlflow"]["model_id"])
    assert model.source_run_id == run.info.run_id and model.name == "blobs_lts"
    assert model.experiment_id == run.info.experiment_id != "0"  # the run's experiment, not Default
    version = mlflow.register_model(lts["mlflow"]["model_uri"], "blobs-lts")  # MLFLOW_TRACKING_URI: the test's
    assert int(version.version) == 1
    loaded = mlflow.pytorch.load_model(f"models:/blobs-lts/{version.version}")
    x = torch.rand(1, 1, 32, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), load_bundle_model(lts["bundle"])(x))


def test_verify_bundle_passes_and_altered_weights_are_refused(exported, tmp_path):
    lines = []
    results = verify_bundle(exported["bundles"]["lts"]["bundle"], SCHEMA_FILE, say=lines.append, trust_code=True)
    assert [name for name, ok, _ in results if not ok] == [], lines
    assert len(lines) == 10 and [r[0] for r in results][:3] == ["files", "sha256", "self-contained"]

    copy = shutil.copytree(exported["bundles"]["ts"]["bundle"], tmp_path / "copy")
    flip_byte(copy / "models" / "model.pt")
    with pytest.raises(WeightFileError, match=r"model\.pt: sha256 check failed"):
        load_bundle_weights(copy)
    assert load_bundle_model(copy) is not None  # the other file is intact and still loads
    flip_byte(copy / "models" / "model.ts")
    with pytest.raises(WeightFileError, match=r"model\.ts: sha256 check failed"):
        load_bundle_model(copy)
    results = {name: (ok, detail) for name, ok, detail in verify_bundle(copy, SCHEMA_FILE, say=lambda _: None)}
    assert not results["sha256"][0] and "model.pt" in results["sha256"][1]
    shutil.copyfile(exported["bundles"]["ts"]["bundle"] / "models" / "model.pt", copy / "models" / "model.pt")
    with open(copy / "models" / "model.pt", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(WeightFileError, match=r"model\.pt: sha256 check failed.*1000 bytes"):
        check_large_files(copy)
    meta = json.loads((copy / "configs" / "metadata.json").read_text())
    del meta["eval_metrics"]
    (copy / "configs" / "metadata.json").write_text(json.dumps(meta))
    results = {name: (ok, detail) for name, ok, detail in verify_bundle(copy, SCHEMA_FILE, say=lambda _: None)}
    assert not results["verify_metadata"][0] and "eval_metrics" in results["verify_metadata"][1]
    large = json.loads((copy / "large_files.yml").read_text())
    large["large_files"][0]["url"] = ""
    (copy / "large_files.yml").write_text(json.dumps(large))
    (copy / "docs" / "data_license.txt").unlink()
    results = {name: (ok, detail) for name, ok, detail in verify_bundle(copy, SCHEMA_FILE, say=lambda _: None)}
    assert not results["files"][0] and "docs/data_license.txt" in results["files"][1]


def test_verify_bundle_runs_no_bundle_code_without_the_flag(exported, tmp_path):
    """A received bundle's scripts/ and configs are code: without --trust-code none of it runs."""
    copy = shutil.copytree(exported["bundles"]["ts"]["bundle"], tmp_path / "received")
    marker_script, marker_config = tmp_path / "scripts_ran", tmp_path / "config_ran"
    init = copy / "scripts" / "__init__.py"
    init.write_text(init.read_text() + f"\nopen({str(marker_script)!r}, 'w').close()\n")
    inference = json.loads((copy / "configs" / "inference.json").read_text())
    inference["network_def"] = f"$open({str(marker_config)!r}, 'w').close() or " + inference["network_def"][1:]
    (copy / "configs" / "inference.json").write_text(json.dumps(inference))
    lines = []
    results = verify_bundle(copy, SCHEMA_FILE, say=lines.append)
    assert not marker_script.exists() and not marker_config.exists()
    assert [name for name, ok, _ in results if ok is None] == [
        "verify_net_in_out", "ckpt_export", "verify_torchscript", "check_properties inference",
        "check_properties evaluate",
        "check_properties train"]
    assert [name for name, ok, _ in results if ok is False] == []
    assert summary(results).startswith("4 of 4 checks passed; 6 checks that run the bundle's code were not run")
    assert "--trust-code" in summary(results)
    verify_bundle(copy, SCHEMA_FILE, say=lambda _: None, trust_code=True)  # the test can fail: with the flag it runs
    assert marker_script.exists() and marker_config.exists()


def test_model_ts_names_no_path_of_the_exporting_machine(exported):
    needles = {str(REPO_ROOT), sys.prefix, str(Path(torch.__file__).parent.parent), str(Path.home()), "/tmp/"}
    for b in exported["bundles"].values():
        blob = (b["bundle"] / "models" / "model.ts").read_bytes()
        with zipfile.ZipFile(b["bundle"] / "models" / "model.ts") as z:
            blob += b"".join(z.read(n) for n in z.namelist())  # the records uncompressed too
        found = [n for n in needles if n.encode() in blob]
        assert found == [], f"{b['name']}: model.ts holds {found}"
        for f in ("configs/metadata.json", "docs/README.md"):
            text = (b["bundle"] / f).read_text()
            assert [n for n in needles if n in text] == [], f"{b['name']}: {f} names a path of this machine"


def test_auto_calibration_chooses_by_the_validation_ece(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "posthoc").mkdir(parents=True)
    (run_dir / "posthoc" / "ts.pt").write_bytes(b"x")
    (run_dir / "posthoc" / "lts.pt").write_bytes(b"x")
    record = {"ts": {"val_ece_before": 0.093, "val_ece_after": 0.149}, "lts": {"val_ece_before": 0.093,
                                                                              "val_ece_after": 0.120}}
    (run_dir / "metrics.json").write_text(json.dumps({"posthoc": record}))
    kind, reason = auto_calibration(run_dir)
    assert kind == "none" and "none lowered the validation ECE 0.0930 (TS 0.1490, LTS 0.1200)" in reason
    record["lts"]["val_ece_after"] = 0.05
    (run_dir / "metrics.json").write_text(json.dumps({"posthoc": record}))
    assert auto_calibration(run_dir)[0] == "lts"
    (run_dir / "posthoc" / "lts.pt").unlink()
    assert auto_calibration(run_dir)[0] == "none"  # only TS fitted, and it raised the ECE


def test_command_lines_export_and_verify(exported, capsys):
    run_dir = str(exported["out"]["run_dir"])
    out_root = exported["tmp"] / "cli"
    assert main(["export", run_dir, "--name", "cli", "--out", str(out_root), "--calibration", "ts",
                 "--no-mlflow"]) == 0
    printed = capsys.readouterr().out
    assert "bundle cli 0.1.0 written to" in printed and "calibration: ts, scripted" in printed
    assert "MLflow:" not in printed and "make verify-bundle NAME=" in printed
    assert main(["export", run_dir, "--name", "cli", "--out", str(out_root)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert verify_main([str(out_root / "cli"), "--trust-code"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "10 of 10 checks passed"
    assert verify_main([str(out_root / "cli")]) == 0
    assert "were not run" in capsys.readouterr().out.strip().splitlines()[-1]
    # the default name carries the run's name: it never replaces the shipped bundle of the same components
    assert main(["export", run_dir, "--out", str(out_root), "--no-mlflow"]) == 0
    assert (out_root / "blobs_segmentation_mbls_unet_exp").is_dir()
    assert verify_main([str(out_root / "nothing")]) == 2


def test_reexport_grows_the_version_and_never_replaces_silently(exported):
    run_dir = str(exported["out"]["run_dir"])
    dest = exported["bundles"]["ts"]["bundle"]
    before = (dest / "configs" / "metadata.json").read_text()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_bundle(run_dir, name="blobs_ts", out_root=dest.parent, calibration="ts")
    assert (dest / "configs" / "metadata.json").read_text() == before
    again = export_bundle(run_dir, name="blobs_ts", out_root=dest.parent, calibration="ts", overwrite=True,
                          log_to_mlflow=False)
    meta = json.loads((again["bundle"] / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.1.1" and list(meta["changelog"]) == ["0.1.1", "0.1.0"]
    assert again["mlflow"] is None
    with pytest.raises(ValueError, match="calibration must be one of"):
        export_bundle(run_dir, name="bad", out_root=dest.parent, calibration="platt")
    assert not (dest.parent / "bad").exists()


# --- the recipient's side (the background process started by the fixture) ------------------------------------
def test_recipient_cannot_import_pipeline_and_inference_writes_four_calibrated_outputs(exported, recipient):
    assert recipient["pipeline_importable"] is False
    received = exported["received"]
    shape = nib.load(received / "input" / "imagesTs" / "scan.nii.gz").shape
    for cal in CALIBRATIONS:
        job = recipient["jobs"][f"infer_{cal}"]
        assert job["ok"], job["error"]
        out = received / f"out_{cal}"
        files = {k: nib.load(out / f"scan_{k}.nii.gz") for k in ("seg", "prob", "confidence", "entropy")}
        for k, img in files.items():
            np.testing.assert_allclose(img.affine, INPUT_AFFINE, atol=1e-5, err_msg=f"{cal} {k}")
        seg = np.asarray(files["seg"].dataobj).reshape(shape)
        prob = np.asarray(files["prob"].dataobj, dtype=np.float64).reshape(*shape, 3)
        conf = np.asarray(files["confidence"].dataobj, dtype=np.float64).reshape(shape)
        entropy = np.asarray(files["entropy"].dataobj, dtype=np.float64).reshape(shape)
        assert files["seg"].get_data_dtype() == np.uint8 and set(np.unique(seg)) <= {0, 1, 2}
        assert prob.min() >= 0 and prob.max() <= 1
        np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-5)
        np.testing.assert_allclose(conf, prob.max(-1), atol=1e-6)
        np.testing.assert_allclose(entropy, -(prob * np.log(np.clip(prob, 1e-30, 1))).sum(-1), atol=1e-5)
        meta = json.loads((exported["bundles"][cal]["bundle"] / "configs" / "metadata.json").read_text())
        ranges = meta["network_data_format"]["outputs"]
        assert ranges["confidence"]["value_range"][0] - 1e-6 <= conf.min() and conf.max() <= 1 + 1e-6
        assert entropy.min() >= -1e-6 and entropy.max() <= ranges["entropy"]["value_range"][1] + 1e-6
        # the same probabilities and segmentation as the run's own evaluation of that volume
        ref = np.moveaxis(_reference_probabilities(exported, cal), 0, -1)
        np.testing.assert_allclose(prob, ref, atol=1e-4)
        top2 = np.sort(ref, -1)[..., -2:]
        differ = seg != ref.argmax(-1)
        assert (top2[..., 1] - top2[..., 0])[differ].max(initial=0) < 1e-4, f"{cal}: {differ.sum()} voxels differ"


def _csv(path: Path) -> dict:
    return dict(csv.reader(open(path)))


def test_recipient_evaluation_reproduces_the_runs_dsc_and_foreground_ece(exported, recipient):
    runs = [(f"evaluate_{cal}", cal) for cal in CALIBRATIONS] + [("evaluate_alone", "ts"), ("evaluate_on_train", "ts")]
    for job_name, cal in runs:
        job = recipient["jobs"][job_name]
        assert job["ok"], f"{job_name}: {job['error']}"
        out = exported["received"] / (f"eval_{cal}" if job_name.endswith(cal) else job_name)
        rows = _csv(out / "metrics.csv")
        meta = json.loads((exported["bundles"][cal]["bundle"] / "configs" / "metadata.json").read_text())
        assert float(rows["test_mean_dice"]) == pytest.approx(meta["eval_metrics"]["dsc"], abs=1e-4), job_name
        assert float(rows["test_foreground_ece"]) == pytest.approx(meta["eval_metrics"]["ece"], abs=2e-4), job_name
        assert float(rows["test_cece"]) == pytest.approx(meta["eval_metrics"]["cece"], abs=2e-4), job_name
        assert 0 <= float(rows["test_calibration_error"]) <= 1
        header = open(out / "test_mean_dice_raw.csv").readline().strip()
        assert header == "filename,outer,inner,mean"  # class names, not class0


def test_recipient_retrains_for_two_epochs_and_inference_uses_those_weights(exported, recipient):
    for name in ("train", "export_retrained", "infer_retrained"):
        assert recipient["jobs"][name]["ok"], f"{name}: {recipient['jobs'][name]['error']}"
    received = exported["received"]
    state = torch.load(received / "retrained" / "model.pt", weights_only=True)
    shipped = load_bundle_weights(exported["bundles"]["none"]["bundle"])
    assert state.keys() == shipped.keys()
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not all(torch.equal(state[k], shipped[k]) for k in state)  # retrained from scratch: other weights
    # inference with the retrained model gives that network's probabilities
    network, _ = _network_and_calibrator(exported, "none")
    network.load_state_dict(state)
    image = np.asarray(nib.load(exported["root"] / "images" / "case04.nii.gz").dataobj, dtype=np.float32)
    x = torch.from_numpy((image - image.min()) / (image.max() - image.min()))[None]
    with torch.no_grad():
        ref = torch.softmax(network(x.movedim(-1, 0)), 1).movedim(0, -1).numpy()  # K×X×Y×Z
    got = np.asarray(nib.load(received / "out_retrained" / "scan_prob.nii.gz").dataobj)
    np.testing.assert_allclose(got.reshape(*image.shape, 3), np.moveaxis(ref, 0, -1), atol=1e-4)
    job = recipient["jobs"]["infer_retrained_unlisted"]  # no sha256 given: refused, naming the file
    assert not job["ok"] and "retrained/model.ts: no sha256" in job["error"] and "--model_sha256" in job["error"]


def test_recipient_is_stopped_by_an_altered_model_file(exported, recipient):
    job = recipient["jobs"]["tampered"]
    assert not job["ok"]
    assert "HashCheckError" in job["error"] and "model.ts" in job["error"] and "sha256" in job["error"]
    assert not (exported["received"] / "out_tampered").exists()


def test_recipient_bad_inputs_are_refused_naming_the_file_or_fixed(exported, recipient):
    received = exported["received"]
    reference = np.moveaxis(_reference_probabilities(exported, "none"), 0, -1)  # X×Y×Z×K
    for case, words in BAD_INPUTS.items():
        job = recipient["jobs"][f"bad_{case}"]
        if words is None:
            continue
        assert not job["ok"], f"{case}: not refused"
        named = str(received / "bad" / case / "imagesTs" / ("scan.nii.gz" if case != "empty" else ""))
        assert named.rstrip("/") in job["error"] and words in job["error"], f"{case}: {job['error']}"
        assert not list((received / "bad_out").glob(f"{case}/*_seg.nii.gz"))
    # intensities ×1000: this run's preprocessing normalises each image (min-max), so the result is the reference
    # a finer grid (half the training spacing): resampled to it, segmented, resampled back; every second voxel is
    # a voxel of the reference volume
    for case in ("x1000", "fine"):
        job = recipient["jobs"][f"bad_{case}"]
        assert job["ok"], f"{case}: {job['error']}"
    x1000 = np.asarray(nib.load(received / "bad_out" / "x1000" / "scan_prob.nii.gz").dataobj)
    np.testing.assert_allclose(x1000.reshape(reference.shape), reference, atol=1e-4)
    prob = np.asarray(nib.load(received / "bad_out" / "fine" / "scan_prob.nii.gz").dataobj)
    shape = tuple(2 * n - 1 for n in reference.shape[:3])
    prob = prob.reshape(*shape, 3)
    np.testing.assert_allclose(prob[::2, ::2, ::2], reference, atol=1e-4)
    np.testing.assert_allclose(nib.load(received / "bad_out" / "fine" / "scan_prob.nii.gz").header.get_zooms()[:3],
                               (0.75, 0.75, 1.5))
