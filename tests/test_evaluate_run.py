"""End to end: a tiny run whose training ends with the full evaluation, then `make evaluate` on it (in-process),
by MLflow run id, by checkpoint, for a run folder MLflow does not know, and for a run whose folder is gone."""

import json
import shutil
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.evaluation import evaluate_run
from pipeline.posthoc import LocalTemperatureScaling, TemperatureScaling
from pipeline.runs import UntrustedRunConfig
from pipeline.training import run_training
from tests.helpers import BLOBS_CONFIG, BlobSource, make_config_dir, tiny_unet_overrides, write_blob_volumes


class SoftBlobSource(BlobSource):
    """The blob volumes with soft reference labels ``probs/caseNN.nii.gz`` (X×Y×Z×3)."""

    def cases(self):
        return [{**c, "probs": str(self.root / "probs" / Path(c["image"]).name)} for c in super().cases()]


def write_soft_labels(root: Path) -> None:
    (root / "probs").mkdir(exist_ok=True)
    for f in sorted((root / "labels").glob("*.nii.gz")):
        img = nib.load(f)
        label = np.asarray(img.dataobj).astype(int)
        q = np.eye(3, dtype=np.float32)[label] * 0.8 + 0.2 / 3
        nib.save(nib.Nifti1Image(q, img.affine), root / "probs" / f.name)


SOFT_CONFIG = BLOBS_CONFIG.replace("tests.helpers.BlobSource", "tests.test_evaluate_run.SoftBlobSource").replace(
    "name: blobs", "name: softblobs").replace("keys: [image, label]", "keys: [image, label, probs]")

SMALL_EVALUATION = {"evaluation::lts::iterations": 10, "evaluation::noise::sigmas": [0.0, 0.05],
                    "evaluation::maps::volumes": 2, "evaluation::maps::slices": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evalrun")
    root = write_blob_volumes(tmp / "data")
    write_soft_labels(root)
    config_dir = make_config_dir(tmp)
    (config_dir / "dataset" / "softblobs.yaml").write_text(SOFT_CONFIG)
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{tmp}/mlruns.db"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    overrides = {"data_dir": str(root), "output_dir": str(tmp / "runs"), **tiny_unet_overrides(), **SMALL_EVALUATION}
    parser = load_config("softblobs", "ce", "unet", overrides=overrides, config_dir=config_dir)
    out = run_training(parser, run_name="soft", quiet=True)
    yield {"out": out, "uri": uri, "tmp": tmp}
    mp.undo()


def test_training_ends_with_the_full_evaluation(trained):
    out, uri = trained["out"], trained["uri"]
    run_dir = out["run_dir"]
    for f in ("reliability.png", "reliability_ts.png", "reliability_lts.png", "reliability_per_class.png",
              "confidence_maps.png", "logits.png", "noise.png"):
        data = (run_dir / f).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000, f
    summary = (run_dir / "summary.md").read_text()
    assert "| TS |" in summary and "| LTS |" in summary and "TS: T =" in summary and "soft-label ECE" in summary
    assert "LTS" in (run_dir / "results.txt").read_text()

    # the fitted calibrators are saved with the run and load around the network
    net = torch.nn.Identity()
    ts = TemperatureScaling.load_calibrator(net, run_dir / "posthoc" / "ts.pt")
    assert ts.temperature == pytest.approx(out["evaluation"]["posthoc"]["ts"]["temperature"])
    LocalTemperatureScaling.load_calibrator(net, run_dir / "posthoc" / "lts.pt")

    # confidence maps with the image's affine
    maps = sorted((run_dir / "maps").glob("*.nii.gz"))
    assert [m.name for m in maps] == ["case04_entropy.nii.gz", "case04_maxprob.nii.gz", "case05_entropy.nii.gz",
                                      "case05_maxprob.nii.gz"]
    image = nib.load(trained["tmp"] / "data" / "images" / "case04.nii.gz")
    maxprob = nib.load(run_dir / "maps" / "case04_maxprob.nii.gz")
    np.testing.assert_allclose(maxprob.affine, image.affine)
    assert maxprob.shape == image.shape
    values = maxprob.get_fdata()
    assert values.min() >= 1 / 3 - 1e-6 and values.max() <= 1 + 1e-6

    res = out["results"]
    assert res["methods"]["ts"]["mean"]["dsc"] == res["mean"]["dsc"]  # TS keeps the argmax
    assert res["noise"][0]["sigma"] == 0.0 and res["noise"][0]["ece"] == pytest.approx(res["mean"]["ece"], abs=1e-12)
    fg = sum(int((np.asarray(nib.load(trained["tmp"] / "data" / "labels" / f"case0{i}.nii.gz").dataobj) > 0).sum())
             for i in (4, 5))
    assert res["reliability"]["count"].sum() == fg  # the diagram bins every ground-truth foreground voxel

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    for key in ("test/dsc", "test/ece", "test/ts/ece", "test/lts/ece", "test/lts/dsc", "test/lts/asd",
                "test/ts/cece", "test/aece", "test/soft/brier", "test/soft/kl", "test/soft/ece",
                "test/monai_calibration_error", "test/logits/distance_mean", "test/noise_0.05/dsc",
                "test/noise_0/ece", "posthoc/ts/temperature", "posthoc/lts/val_nll_after", "val/best_dsc"):
        assert key in m, key
    assert m["test/ts/ece"] == pytest.approx(res["methods"]["ts"]["mean"]["ece"])
    top = {a.path for a in client.list_artifacts(out["run_id"])}
    assert {"summary.md", "reliability_lts.png", "noise.png", "posthoc", "maps", "checkpoints", "config.yaml"} <= top
    assert {a.path for a in client.list_artifacts(out["run_id"], "posthoc")} == {"posthoc/ts.pt", "posthoc/lts.pt"}


def test_make_evaluate_logs_into_the_same_run(trained, capsys):
    out, uri = trained["out"], trained["uri"]
    args = [f"--set={k}={json.dumps(v)}" for k, v in SMALL_EVALUATION.items()]
    assert main(["evaluate", out["run_id"], "--quiet", *args]) == 0
    printed = capsys.readouterr().out
    assert "Post-hoc calibration" in printed and "test metrics at step 1" in printed and out["run_id"] in printed

    client = mlflow.MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(out["run_id"], "test/dsc")
    assert sorted(h.step for h in history) == [0, 1]
    assert len({h.value for h in history}) == 1  # the same weights and data give the same DSC
    lts = client.get_metric_history(out["run_id"], "test/lts/ece")
    assert len(lts) == 2 and lts[0].value == lts[1].value  # seeded fits: the training's evaluation is reproduced
    run = client.get_run(out["run_id"])
    assert run.data.tags["evaluation_step"] == "1" and run.info.status == "FINISHED"
    summary = json.loads((out["run_dir"] / "metrics.json").read_text())
    assert summary["evaluation_step"] == 1 and "best_val_dsc" in summary and "train_seconds" in summary
    assert {"checkpoints", "summary.md"} <= {a.path for a in client.list_artifacts(out["run_id"])}


def test_evaluate_by_checkpoint_unknown_folder_and_missing_folder(trained, tmp_path):
    out, uri = trained["out"], trained["uri"]
    client = mlflow.MlflowClient(tracking_uri=uri)

    before = max(h.step for h in client.get_metric_history(out["run_id"], "test/dsc"))
    by_ckpt = evaluate_run(str(out["best_checkpoint"]), overrides=SMALL_EVALUATION, quiet=True)
    assert by_ckpt["run_id"] == out["run_id"] and not by_ckpt["created_run"]
    assert by_ckpt["step"] == before + 1
    assert max(h.step for h in client.get_metric_history(out["run_id"], "test/ece")) == before + 1

    # a copy of the run folder that no MLflow run records, with a config from before the evaluation settings
    copy = tmp_path / "copied-run"
    shutil.copytree(out["run_dir"], copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg.pop("evaluation")
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UntrustedRunConfig, match=r"copied-run/config.yaml is not a config this machine's MLflow store "
                                                 r"recorded \(no MLflow run of this tracking store records the folder"):
        evaluate_run(str(copy), overrides=SMALL_EVALUATION, quiet=True)
    new = evaluate_run(str(copy), overrides=SMALL_EVALUATION, quiet=True, trust=True)
    assert new["created_run"] and new["run_id"] != out["run_id"]
    assert "no MLflow run" in new["how"] and f"created MLflow run {new['run_id']}" in new["how"]
    assert new["settings"]["lts"]["lr"] == 0.001  # defaults filled in for the missing block
    run = client.get_run(new["run_id"])
    assert run.data.params["run_dir"] == str(copy) and run.data.metrics["test/dsc"] == pytest.approx(
        out["results"]["mean"]["dsc"])

    # the original folder is gone: restored from the run's MLflow artifacts
    hidden = tmp_path / "hidden"
    shutil.move(out["run_dir"], hidden)
    try:
        restored = evaluate_run(out["run_id"], overrides=SMALL_EVALUATION, quiet=True, runs_root=tmp_path / "runs")
        assert "restored from its artifacts" in restored["how"] and restored["run_id"] == out["run_id"]
        assert restored["run_dir"] == tmp_path / "runs" / "soft"
        assert restored["results"]["mean"]["dsc"] == pytest.approx(out["results"]["mean"]["dsc"])
    finally:
        shutil.move(hidden, out["run_dir"])


def _with_marker(config: Path, marker: Path) -> None:
    """Make the config's ``seed`` an expression that writes ``marker`` when it is evaluated."""
    cfg = yaml.safe_load(config.read_text())
    cfg["seed"] = f"$[open({str(marker)!r}, 'w').close(), 0][1]"
    config.write_text(yaml.safe_dump(cfg))


def test_a_run_folder_from_elsewhere_is_not_read_without_trust(trained, tmp_path, capsys):
    received = tmp_path / "received-run"
    shutil.copytree(trained["out"]["run_dir"], received)
    marker = tmp_path / "marker"
    _with_marker(received / "config.yaml", marker)
    for argv in (["evaluate", str(received), "--quiet"], ["train", "--resume", str(received), "--quiet"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: {received}/config.yaml is not a config this machine's MLflow store recorded" in err
        assert "is code: its `$` expressions run as Python" in err and "--trust" in err
        assert not marker.exists()
    assert main(["evaluate", str(received), "--quiet", "--trust", *[a for k, v in SMALL_EVALUATION.items()
                                                                     for a in ("--set", f"{k}={json.dumps(v)}")]]) == 0
    assert marker.exists()  # with the flag, the config's code ran


def test_a_run_config_edited_after_training_is_not_read_without_trust(trained, tmp_path):
    config = Path(trained["out"]["run_dir"]) / "config.yaml"
    original = config.read_text()
    marker = tmp_path / "marker"
    try:
        _with_marker(config, marker)
        with pytest.raises(UntrustedRunConfig, match=r"it differs from the config.yaml its MLflow run \w+ logged"):
            evaluate_run(trained["out"]["run_id"], overrides=SMALL_EVALUATION, quiet=True)
        assert not marker.exists()
    finally:
        config.write_text(original)


def test_evaluate_run_names_what_is_missing(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="RUN 'no-such-run' is neither an existing checkpoint"):
        evaluate_run("no-such-run", quiet=True)
    empty = tmp_path / "empty-run"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no best checkpoint \(best\*\.pt\) in .*empty-run/checkpoints"):
        evaluate_run(str(empty), quiet=True)
    ckpt = tmp_path / "no-config" / "checkpoints" / "best_x.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(trained["out"]["best_checkpoint"], ckpt)
    with pytest.raises(FileNotFoundError, match="no config.yaml in the run folder .*no-config"):
        evaluate_run(str(ckpt), quiet=True)
    assert main(["evaluate", str(empty), "--quiet"]) == 2  # the CLI prints the message instead of a traceback
