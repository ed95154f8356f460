"""Export of a trained run as a MONAI bundle, then the bundle used the way MONAI's tools use it (in-process)."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, run, verify_metadata, verify_net_in_out

from pipeline.config import load_config
from pipeline.export import SCHEMA_FILE, export_bundle, image_preprocessing
from pipeline.posthoc import TemperatureScaling
from pipeline.training import run_training
from tests.helpers import make_config_dir, tiny_unet_overrides, write_blob_volumes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exportrun")
    root = write_blob_volumes(tmp / "data")
    config_dir = make_config_dir(tmp)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlruns.db")
    overrides = {"data_dir": str(root), "output_dir": str(tmp / "runs"), **tiny_unet_overrides(), "epochs": 1,
                 "evaluation::posthoc": ["ts"], "evaluation::noise::sigmas": [], "evaluation::maps::volumes": 0,
                 "evaluation::maps::slices": 0}
    out = run_training(load_config("blobs", "ce", "unet", overrides=overrides, config_dir=config_dir),
                       run_name="exp", quiet=True)
    yield {"out": out, "tmp": tmp, "root": root}
    mp.undo()


def test_bundle_files_metadata_and_network(trained):
    dest = export_bundle(str(trained["out"]["run_dir"]), out_root=trained["tmp"] / "bundles")
    for f in ("configs/inference.yaml", "configs/metadata.json", "models/model.pt", "docs/README.md"):
        assert (dest / f).is_file(), f
    meta = json.loads((dest / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "outer",
                                                                               "2": "inner"}
    verify_metadata(meta_file=str(dest / "configs" / "metadata.json"), filepath=str(SCHEMA_FILE))
    verify_net_in_out(net_id="network_def", meta_file=str(dest / "configs" / "metadata.json"),
                      config_file=str(dest / "configs" / "inference.yaml"), n=1, any=19)
    # the exported network is the run's network inside its fitted temperature scaling
    parser = ConfigParser()
    parser.read_config(str(dest / "configs" / "inference.yaml"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(dest / "models" / "model.pt", weights_only=True))
    fitted = torch.load(trained["out"]["run_dir"] / "posthoc" / "ts.pt", weights_only=True)
    assert isinstance(net, TemperatureScaling) and net.temperature == pytest.approx(fitted["temperature"], rel=1e-5)
    assert "test metrics" in (dest / "docs" / "README.md").read_text().lower()


def test_bundle_runs_and_matches_the_trained_network(trained):
    dest = export_bundle(str(trained["out"]["run_dir"]), name="plain", calibration="none",
                         out_root=trained["tmp"] / "bundles")
    images = trained["root"] / "images"
    out_dir = trained["tmp"] / "predictions"
    run(run_id="run", bundle_root=str(dest), config_file=str(dest / "configs" / "inference.yaml"),
        meta_file=str(dest / "configs" / "metadata.json"), input_dir=str(images), output_dir=str(out_dir),
        logging_file=None)
    source = nib.load(images / "case04.nii.gz")
    seg = nib.load(out_dir / "case04_seg.nii.gz")
    prob = nib.load(out_dir / "case04_prob.nii.gz")
    assert seg.shape[:3] == source.shape and np.allclose(seg.affine, source.affine)
    p = np.asarray(prob.dataobj).reshape(*source.shape, 3)
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(seg.dataobj).reshape(source.shape), p.argmax(-1))
    # the same probabilities as the trained network run by the pipeline on the preprocessed volume
    parser = ConfigParser()
    parser.read_config(str(trained["out"]["run_dir"] / "config.yaml"))
    from pipeline.engines import SliceBatchInferer
    from pipeline.runs import load_weights

    network = parser.get_parsed_content("network").eval()
    load_weights(network, trained["out"]["best_checkpoint"])
    x = torch.from_numpy(np.asarray(source.dataobj, dtype=np.float32))
    x = ((x - x.min()) / (x.max() - x.min()))[None, None]  # the run's image preprocessing: ScaleIntensityd
    with torch.no_grad():
        ref = torch.softmax(SliceBatchInferer(2)(x, network), 1)[0].permute(1, 2, 3, 0).numpy()
    np.testing.assert_allclose(p, ref, atol=1e-4)


def test_label_guided_steps_are_left_out_and_existing_bundles_kept(trained):
    parser = ConfigParser({"preprocess": [
        {"_target_": "LoadImaged", "keys": ["image", "label"]},
        {"_target_": "CropForegroundd", "keys": ["image", "label"], "source_key": "label"},
        {"_target_": "MapLabelValued", "keys": "label", "orig_labels": [4], "target_labels": [3]},
        {"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [1, 1, 1], "mode": ["bilinear", "nearest"]},
    ]})
    kept, dropped = image_preprocessing(parser)
    assert [k["_target_"] for k in kept] == ["LoadImaged", "Spacingd"]
    assert kept[1]["mode"] == "bilinear" and kept[1]["keys"] == ["image"]
    assert dropped == ["CropForegroundd (uses source_key)", "MapLabelValued (label only)"]
    bundles = trained["tmp"] / "bundles"
    first = export_bundle(str(trained["out"]["run_dir"]), name="keep", calibration="none", out_root=bundles)
    (first / "marker").write_text("x")
    with pytest.raises(FileExistsError, match="exists"):
        export_bundle(str(trained["out"]["run_dir"]), name="keep", calibration="none", out_root=bundles)
    assert (first / "marker").read_text() == "x"
    with pytest.raises(FileNotFoundError, match="no fitted LTS calibrator"):
        export_bundle(str(trained["out"]["run_dir"]), name="lts", calibration="lts", out_root=bundles)
    assert not (bundles / "lts").exists()


def test_bundle_command_line_of_monai_verifies_the_export(trained):
    # the README's command: MONAI's own command line (which needs the `fire` package) on an exported bundle
    import subprocess
    import sys
    from pathlib import Path

    dest = export_bundle(str(trained["out"]["run_dir"]), name="cli", out_root=trained["tmp"] / "bundles")
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file",
                           str(dest / "configs" / "metadata.json"), "--filepath", str(SCHEMA_FILE)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "metadata is verified with no error" in done.stdout + done.stderr


def test_lts_bundle_holds_the_reference_temperature_network(trained, tmp_path):
    """A run with a fitted LTS exports the released temperature network inside the bundle's network."""
    import shutil

    from pipeline.posthoc import LocalTemperatureScaling, ReferenceTemperatureNet

    run_dir = tmp_path / "lts-run"
    shutil.copytree(trained["out"]["run_dir"], run_dir)
    tnet = ReferenceTemperatureNet(3, 1)
    with torch.no_grad():
        for p in tnet.parameters():
            p.normal_(0, 0.1)
    LocalTemperatureScaling(torch.nn.Identity(), tnet).save_calibrator(run_dir / "posthoc" / "lts.pt")
    dest = export_bundle(str(run_dir), name="lts", calibration="lts", out_root=tmp_path / "bundles")
    parser = ConfigParser()
    parser.read_config(str(dest / "configs" / "inference.yaml"))
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(dest / "models" / "model.pt", weights_only=True))
    assert isinstance(net, LocalTemperatureScaling) and isinstance(net.temperature_net, ReferenceTemperatureNet)
    x = torch.rand(2, 1, 19, 21)
    with torch.no_grad():
        logits = net.network.eval()(x)
        assert torch.allclose(net.eval()(x), logits / tnet(logits, x), atol=1e-5)
    assert "local temperature scaling" in (dest / "docs" / "README.md").read_text()
