"""Bad values: numbers such as ``1e6`` parse as numbers (command line and config files), a NaN stop keeps the last
good checkpoint, every image with NaN/Inf values is named at once, a training number out of range is refused before
anything is created (exit 2, naming the key and the range), and a damaged prepared ``mni`` file is named."""

import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline import cli
from pipeline.config import load_config, parse_assignments, parse_value
from pipeline.data.loading import NonFiniteImageError
from pipeline.data.mni import MNI152Slabs
from pipeline.data.prepare import prepare_data
from pipeline.engines import NonFiniteLossError
from pipeline.training import run_training
from tests.helpers import make_config_dir, state_dict_equal, tiny_unet_overrides, write_blob_volumes
from tests.tracking_helpers import ready_store


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-values")
    return write_blob_volumes(tmp / "data"), make_config_dir(tmp)


@pytest.mark.parametrize("text, expected", [
    ("1e6", 1e6), ("1e-3", 1e-3), ("-2E+4", -2e4), ("1.5e3", 1500.0), (".5", 0.5), ("3", 3), ("0.1", 0.1),
    ("[1e-3, 2]", [1e-3, 2]), ("{a: 1e2}", {"a": 100.0}),
    ("'1e6'", "1e6"), ("$1e6 * 2", "$1e6 * 2"), ("@lr", "@lr"), ("1e", "1e"), ("e5", "e5"), ("abc", "abc"),
])
def test_numbers_on_the_command_line_parse_as_numbers(text, expected):
    value = parse_value(text)
    assert value == expected and type(value) is type(expected)


def test_lr_1e6_reaches_the_optimizer_as_a_number(blobs):
    root, config_dir = blobs
    overrides = parse_assignments(["lr=1e6", "lr_gamma=1e-1"])
    assert overrides == {"lr": 1e6, "lr_gamma": 0.1}
    parser = load_config("blobs", "ce", "unet", {**overrides, **tiny_unet_overrides()}, config_dir)
    optimizer = parser.get_parsed_content("optimizer")  # a string "1e6" made Adam raise a TypeError
    assert optimizer.param_groups[0]["lr"] == 1e6


def test_numbers_in_config_files_parse_as_numbers(blobs, tmp_path):
    config_dir = tmp_path / "configs"
    shutil.copytree(blobs[1], config_dir)
    (config_dir / "loss" / "sci.yaml").write_text(
        "loss:\n  _target_: pipeline.losses.build_loss\n  name: ce\nlr: 1e-3\nlr_gamma: 5E-1\nn_bins: 15\n"
        "experiment_name: '1e3'\n")
    parser = load_config("blobs", "sci", "unet", tiny_unet_overrides(), config_dir)
    assert parser["lr"] == 1e-3 and parser["lr_gamma"] == 0.5 and parser["n_bins"] == 15
    assert parser["experiment_name"] == "1e3"  # quoted: stays a string
    assert parser["lr_step"].startswith("$")  # expressions untouched
    assert parser.get_parsed_content("optimizer").param_groups[0]["lr"] == 1e-3


def test_a_key_repeated_in_a_config_file_is_refused(blobs, tmp_path):
    config_dir = tmp_path / "configs"
    shutil.copytree(blobs[1], config_dir)
    (config_dir / "loss" / "twice.yaml").write_text("loss:\n  _target_: x\nlr: 0.1\nlr: 0.2\n")
    with pytest.raises(ValueError, match=r"twice.yaml, line 4: the key 'lr' appears twice"):
        load_config("blobs", "twice", "unet", None, config_dir)


def test_a_nan_stop_keeps_the_last_good_checkpoint(blobs, tmp_path, monkeypatch):
    root, config_dir = blobs
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ready_store(tmp_path))
    overrides = {"data_dir": str(root), "output_dir": str(tmp_path / "runs"), **tiny_unet_overrides(),
                 "epochs": 3, "evaluation::noise::sigmas": []}
    # 5 iterations per epoch: NaN from iteration 7, in epoch 2, after epoch 1's checkpoint
    nan = load_config("blobs", "ce", "unet", {**overrides, "loss": {"_target_": "tests.helpers.NaNAfter", "n": 7}},
                      config_dir)
    with pytest.raises(NonFiniteLossError, match="at epoch 2, iteration 7"):
        run_training(nan, run_name="nan", quiet=True)
    last = torch.load(tmp_path / "runs" / "nan" / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in last["network"].values() if v.is_floating_point())
    # the same as epoch 1 of a clean run (the loss is plain cross-entropy until it turns NaN)
    clean = load_config("blobs", "ce", "unet", {**overrides, "epochs": 1, "lr_step": 1}, config_dir)
    run_training(clean, run_name="clean", quiet=True)
    ref = torch.load(tmp_path / "runs" / "clean" / "checkpoints" / "last.pt", weights_only=True)
    assert state_dict_equal(last["network"], ref["network"])


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_every_image_with_nan_or_inf_is_named_at_once(blobs, tmp_path, cache):
    root = tmp_path / "data"
    shutil.copytree(blobs[0], root)
    for case, bad in (("case01", np.nan), ("case04", np.inf)):
        f = root / "images" / f"{case}.nii.gz"
        img = nib.load(f)
        arr = np.asarray(img.dataobj, dtype=np.float32).copy()
        arr[2, 3, 1] = bad
        nib.save(nib.Nifti1Image(arr, img.affine), f)
    parser = load_config("blobs", "ce", "unet", {"data_dir": str(root), "cache": cache,
                                                 "cache_dir": str(tmp_path / "cache")}, blobs[1])
    with pytest.raises(NonFiniteImageError) as err:
        prepare_data(parser)
    msg = str(err.value)
    assert msg.startswith("2 images hold NaN or infinite values")
    assert re.search(r"case case01: \d+ NaN or infinite value\(s\) in 'image' .*case01\.nii\.gz", msg)
    assert re.search(r"case case04: \d+ NaN or infinite value\(s\) in 'image' .*case04\.nii\.gz", msg)  # test split
    if cache == "disk":
        assert not list((tmp_path / "cache").glob("case01-*.pt"))  # nothing cached for a bad case


@pytest.mark.parametrize("args, key, allowed", [
    (["--epochs", "0"], "epochs", "a whole number >= 1, got 0"),
    (["--epochs", "-5"], "epochs", "a whole number >= 1, got -5"),
    (["--set", "epochs=abc"], "epochs", "a whole number >= 1, got 'abc'"),
    (["--set", "epochs=2.5"], "epochs", "a whole number >= 1, got 2.5"),
    (["--set", "val_interval=0"], "val_interval", "a whole number >= 1, got 0"),
    (["--set", "checkpoint_interval=0"], "checkpoint_interval", "a whole number >= 1, got 0"),
    (["--set", "batch_size=0"], "batch_size", "a whole number >= 1, got 0"),
    (["--set", "batch_size=true"], "batch_size", "a whole number >= 1, got True"),
    (["--set", "lr=abc"], "lr", "a number > 0, got 'abc'"),
    (["--set", "lr=-1e-3"], "lr", "a number > 0, got -0.001"),
    (["--set", "lr_gamma=0"], "lr_gamma", "a number > 0, got 0"),
    (["--set", "lr_step=0"], "lr_step", "a whole number >= 1, got 0"),
    (["--set", "num_workers=-1"], "num_workers", "a whole number >= 0, got -1"),
    (["--set", "seed=-1"], "seed", "a whole number >= 0 and <= 4294967295, got -1"),
    (["--set", "n_bins=0"], "n_bins", "a whole number >= 1, got 0"),
    (["--set", "cache_memory_fraction=1.5"], "cache_memory_fraction", "a number > 0 and <= 1, got 1.5"),
])
def test_a_bad_number_is_refused_before_anything_is_created(args, key, allowed, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    code = cli.main(["train", "--quiet", "--data-dir", str(tmp_path / "data"), "--set",
                     f"output_dir={tmp_path / 'runs'}", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert f"config key '{key}' (" in err and f"must be {allowed}" in err, err
    assert list(tmp_path.iterdir()) == []  # no run folder, no MLflow store, no prepared data


def test_an_expression_that_fails_on_a_bad_number_names_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    parser = load_config("mni", "ce", "unet", {"epochs": 3, "lr_step": "$@epochs // 'x'"})
    with pytest.raises(ValueError, match=r"config key 'lr_step' .* cannot be evaluated .*expected a whole number"):
        run_training(parser, run_name="x")
    assert list(tmp_path.iterdir()) == []


def test_epochs_not_a_number_on_the_command_line_names_the_option(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--epochs", "abc"])
    assert stop.value.code == 2 and "argument --epochs: invalid int value: 'abc'" in capsys.readouterr().err


def test_a_damaged_prepared_mni_file_is_named(tmp_path, monkeypatch, capsys):
    root = tmp_path / "mni"
    MNI152Slabs(root).prepare()
    image = root / "images" / "mni152_slab03.nii.gz"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])  # cut short, as by a full disk
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    code = cli.main(["train", "--quiet", "--epochs", "1", "--data-dir", str(root), "--set",
                     f"output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "case mni152_slab03: images/mni152_slab03.nii.gz: truncated or corrupt gzip data" in err, err
    assert f"delete {root} to prepare the dataset again" in err and "EOFError" not in err
    assert not (tmp_path / "runs").exists()
