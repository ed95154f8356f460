"""The parts of the bundle export, without a trained run: transforms, vendoring, bundle losses, TorchScript,
metadata, data layout (the end-to-end export is in test_export_bundle.py)."""

import json

import pytest
import torch
from monai.bundle import ConfigParser
from torch import nn

from pipeline.config import load_config
from pipeline.export import default_bundle_name, image_preprocessing, labelled_preprocessing
from pipeline.export import scripts as vendoring
from pipeline.export.bundle_scripts import losses as bundle_losses
from pipeline.export.dataset import case_layout, datalist, write_bundle_dataset
from pipeline.export.metadata import next_version, required_packages
from pipeline.export.torchscript import shipped_model
from pipeline.export.transforms import input_value_range, plain_value, slice_sampling
from pipeline.losses import LOSSES, build_loss
from pipeline.networks import PadToMultiple, PlainUNet

LOSS_CASES = [(name, {}) for name in LOSSES if name not in vendoring.WITHOUT_BUNDLE_VERSION] + [
    ("mbls", {"margin": 2.0, "alpha": 0.3}), ("mbls_l2", {"margin": 1.0, "one_sided": False}),
    ("mbls_dice", {"margin": 3.0}), ("focal", {"gamma": 2.0}), ("ecp", {"alpha": 0.3}), ("ls", {"alpha": 0.2}),
    ("svls", {"kernel_size": 5, "sigma": 0.7}), ("nacl", {"kernel": "gaussian", "distance": "l2", "alpha": 0.3}),
    ("nacl", {"variant": "monai"}), ("acls", {"margin": 3.0}), ("ace_soft", {"n_bins": 10}),
]


@pytest.mark.parametrize("name,params", LOSS_CASES)
def test_bundle_losses_equal_the_pipeline_losses_in_value_and_gradient(name, params):
    gen = torch.Generator().manual_seed(len(name))
    for shape in ((2, 4, 9, 7), (1, 3, 5, 6, 4)):
        logits = (torch.randn(*shape, generator=gen) * 6).requires_grad_()
        labels = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=gen).float()
        ours = build_loss(name, **params)(logits, labels)
        (g_ours,) = torch.autograd.grad(ours, logits)
        bundled = getattr(bundle_losses, LOSSES[name].__name__)(**params)(logits, labels)
        (g_bundled,) = torch.autograd.grad(bundled, logits)
        torch.testing.assert_close(bundled, ours, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_bundled, g_ours, rtol=1e-4, atol=1e-8)


def test_bundle_losses_refuse_bad_input():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        bundle_losses.MarginLoss()(torch.zeros(1, 3, 2, 2), torch.full((1, 1, 2, 2), 3.0))
    with pytest.raises(ValueError, match="margin must be a number"):
        bundle_losses.MarginLoss(margin=-1)
    with pytest.raises(ValueError, match=r"labels have shape \(1, 2, 2\), expected"):
        bundle_losses.CrossEntropy()(torch.zeros(2, 3, 2, 2), torch.zeros(1, 2, 2))


def test_every_loss_has_a_bundle_version():
    names = vendoring.loss_class_names()
    assert set(names) == set(LOSSES) - set(vendoring.WITHOUT_BUNDLE_VERSION) == set(LOSSES) - {"crac"}
    assert all(hasattr(bundle_losses, cls) for cls in names.values())
    parser = load_config("mni", "mbls_l2", "unet", overrides={"loss::margin": 8})
    assert vendoring.loss_config(parser) == {"_target_": "scripts.losses.MarginL2Loss", "margin": 8, "alpha": 0.1,
                                             "one_sided": True}


def test_a_loss_without_bundle_version_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="loss 'crac' has no bundle version: its multipliers are training state"):
        vendoring.loss_config(load_config("mni", "crac", "unet"))


def test_preprocessing_is_restricted_to_the_keys_a_bundle_reads():
    parser = ConfigParser({"size": [8, 8, 4], "preprocess": [
        {"_target_": "LoadImaged", "keys": ["image", "label", "probs"], "allow_missing_keys": True},
        {"_target_": "CropForegroundd", "keys": ["image", "label"], "source_key": "label"},
        {"_target_": "MapLabelValued", "keys": "label", "orig_labels": [4], "target_labels": [3]},
        {"_target_": "Spacingd", "keys": ["image", "label", "probs"], "pixdim": [1, 1, 1],
         "mode": ["bilinear", "nearest", "bilinear"]},
        {"_target_": "ResizeWithPadOrCropd", "keys": ["image", "label"], "spatial_size": "@size"},
        {"_target_": "NormalizeIntensityd", "keys": "probs"},
    ]})
    kept, dropped = image_preprocessing(parser)
    assert [k["_target_"] for k in kept] == ["LoadImaged", "Spacingd", "ResizeWithPadOrCropd"]
    assert kept[0] == {"_target_": "LoadImaged", "keys": ["image"]}
    assert kept[1]["mode"] == "bilinear" and kept[2]["spatial_size"] == [8, 8, 4]
    assert dropped == ["CropForegroundd (uses source_key)", "MapLabelValued (label only)",
                       "NormalizeIntensityd (probs only)"]
    kept, dropped = labelled_preprocessing(parser)
    assert [k["_target_"] for k in kept] == ["LoadImaged", "CropForegroundd", "MapLabelValued", "Spacingd",
                                            "ResizeWithPadOrCropd"]
    assert kept[3]["mode"] == ["bilinear", "nearest"] and dropped == ["NormalizeIntensityd (probs only)"]


def test_references_resolve_to_plain_values_or_component_configs():
    parser = ConfigParser({"k": 3, "net": {"_target_": "torch.nn.Conv2d", "in_channels": 1, "out_channels": "@k",
                                           "kernel_size": "$@k - 2"}, "obj": "$torch.nn.Identity()",
                           "wrap": {"_target_": "X", "net": "@net", "dtype": "$torch.float16", "f": "$lambda x: x"}})
    assert plain_value(parser, parser.get("wrap"), "wrap") == {
        "_target_": "X", "net": {"_target_": "torch.nn.Conv2d", "in_channels": 1, "out_channels": 3, "kernel_size": 1},
        "dtype": "$torch.float16", "f": "$lambda x: x"}
    with pytest.raises(ValueError, match="'x' \\(@obj\\): it resolves to a Identity"):
        plain_value(ConfigParser({"obj": "$torch.nn.Identity()", "x": "@obj"}), "@obj", "x")


def test_slice_sampling_and_input_ranges():
    crop, squeeze = slice_sampling(0)
    assert crop["roi_size"] == [1, -1, -1] and not crop["random_size"] and squeeze["dim"] == 1
    assert input_value_range([{"_target_": "ScaleIntensityd", "keys": "image"}]) == [0.0, 1.0]
    assert input_value_range([{"_target_": "ScaleIntensityRanged", "a_min": -57, "a_max": 164, "b_min": 1.0,
                               "b_max": -1.0, "clip": True}]) == [-1.0, 1.0]
    assert input_value_range([{"_target_": "ScaleIntensityRanged", "b_min": 0, "b_max": 1, "clip": False}]) == []
    assert input_value_range([{"_target_": "ScaleIntensityd"}, {"_target_": "NormalizeIntensityd"}]) == []


def test_project_components_are_vendored_verbatim_or_refused(tmp_path):
    files = {}
    config = vendoring.vendor_targets({"network_def": {"_target_": "pipeline.networks.PadToMultiple", "net": {
        "_target_": "pipeline.networks.PlainUNet"}}, "pre": [{"_target_": "pipeline.data.transforms.AddSliceAxisd"}],
        "post": {"_target_": "monai.transforms.Activationsd"}}, files)
    assert config["network_def"]["_target_"] == "scripts.padding.PadToMultiple"
    assert config["network_def"]["net"]["_target_"] == "scripts.unet.PlainUNet"
    assert config["pre"][0]["_target_"] == "scripts.transforms.AddSliceAxisd"
    assert config["post"]["_target_"] == "monai.transforms.Activationsd"
    assert sorted(files) == ["padding.py", "transforms.py", "unet.py"]
    with pytest.raises(ValueError, match=r"cannot vendor 'pipeline.losses.mbls.MarginLoss' \(at loss\).*imports"):
        vendoring.vendor_targets({"loss": {"_target_": "pipeline.losses.mbls.MarginLoss"}}, {})
    with pytest.raises(ValueError, match="uses this project's code"):
        vendoring.vendor_targets({"x": "$pipeline.config.REPO_ROOT"}, {})

    bundle = tmp_path / "b"
    (bundle / "configs").mkdir(parents=True)
    written = vendoring.write_scripts(bundle / "scripts", files, ["losses.py"])
    assert written == ["__init__.py", "losses.py", "padding.py", "transforms.py", "unet.py"]
    assert (bundle / "scripts" / "unet.py").read_text() == files["unet.py"].read_text()
    (bundle / "configs" / "train.json").write_text(json.dumps(config))
    vendoring.check_self_contained(bundle)
    (bundle / "scripts" / "extra.py").write_text("from pipeline.io import write_nifti\n")
    with pytest.raises(ValueError, match=r"extra.py imports the 'pipeline' package"):
        vendoring.check_self_contained(bundle)
    (bundle / "scripts" / "extra.py").unlink()
    (bundle / "configs" / "inference.json").write_text(json.dumps({"net": {"_target_": "pipeline.networks.X"}}))
    with pytest.raises(ValueError, match=r"inference.json uses the 'pipeline' package"):
        vendoring.check_self_contained(bundle)
    assert vendoring.write_scripts(tmp_path / "none", {}) == []
    assert not (tmp_path / "none").exists()


def test_default_bundle_name_in_model_zoo_style():
    assert default_bundle_name(load_config()) == "mni_brain_tissue_mbls_unet"
    parser = ConfigParser({"dataset": {"class_names": ["a", "b"]}, "dataset_name": "BraTS", "loss_name": "ce_dice",
                           "backbone_name": "unet_paper"})
    assert default_bundle_name(parser) == "brats_segmentation_ce_dice_unet_paper"


def test_versions_grow_and_packages_are_listed():
    version, log = next_version(None, "first")
    assert (version, log) == ("0.1.0", {"0.1.0": "first"})
    version, log = next_version({"version": "0.1.9", "changelog": log}, "again")
    assert version == "0.1.10" and list(log) == ["0.1.10", "0.1.0"]
    packages = required_packages([{"imports": ["$import os", "$import torch", "$from scipy import ndimage"],
                                   "reader": {"_target_": "monai.data.PILReader"}, "x": {"_target_": "ignite.X"}}],
                                 script_modules={"monai", "einops", "__future__"})
    assert set(packages) == {"einops", "fire", "nibabel", "pillow", "pytorch-ignite", "scipy"}
    assert all(v != "unknown" for v in packages.values())


class _Calibrated(nn.Module):
    """A calibrator TorchScript cannot compile (``**kwargs``), fully convolutional: traced, then checked."""

    def __init__(self, network, shape_dependent=False):
        super().__init__()
        self.network, self.shape_dependent = network, shape_dependent
        self.scale = nn.Conv2d(3, 1, 3, padding=1)

    def calibrate(self, logits, image, **unused):
        t = 1.0 + torch.sigmoid(self.scale(logits))
        if self.shape_dependent:  # a Python number from the shape: frozen into a trace
            t = t * float(logits.shape[-1])
        return logits / t

    def forward(self, x):
        return self.calibrate(self.network(x), x)


def test_shipped_model_compiles_any_calibrator_and_checks_a_trace():
    torch.manual_seed(0)
    network = PadToMultiple(PlainUNet(2, 1, 3, features=(4, 8), pools=(2,)), 2).eval()
    calibrator = _Calibrated(network).eval()
    model, how = shipped_model(network, calibrator, 1, 3)
    assert how == "traced"
    own = {n for n, _ in model.named_parameters() if n.startswith("calibration.")}
    assert own == {"calibration.calibrator.scale.weight", "calibration.calibrator.scale.bias"}  # no second network
    x = torch.rand(2, 1, 23, 17)
    with torch.no_grad():
        torch.testing.assert_close(model(x), calibrator(x))
        model, how = shipped_model(network, None, 1, 3)
        assert how == "none"
        torch.testing.assert_close(model(x), network(x))
    with pytest.raises(ValueError, match="traced calibration step of _Calibrated differs"):
        shipped_model(network, _Calibrated(network, shape_dependent=True).eval(), 1, 3)


def test_case_layout_datalist_and_copies(tmp_path):
    (tmp_path / "src").mkdir()
    for f in ("a_t1.nii.gz", "a_t2.nii.gz", "a_seg.nii.gz", "b.nii", "b_seg.nii"):
        (tmp_path / "src" / f).write_bytes(f.encode())
    src = str(tmp_path / "src")
    cases = {"a": {"image": [f"{src}/a_t1.nii.gz", f"{src}/a_t2.nii.gz"], "label": f"{src}/a_seg.nii.gz"},
             "b": {"image": f"{src}/b.nii", "label": f"{src}/b_seg.nii"}}
    layout = case_layout({"train": ["a"], "val": [], "test": ["b"]}, cases)
    assert datalist(layout) == {
        "training": [{"image": ["imagesTr/a_0000.nii.gz", "imagesTr/a_0001.nii.gz"], "label": "labelsTr/a.nii.gz"}],
        "validation": [], "test": [{"image": "imagesTs/b.nii", "label": "labelsTs/b.nii"}]}
    write_bundle_dataset(layout, tmp_path / "data")
    assert (tmp_path / "data" / "imagesTr" / "a_0001.nii.gz").read_bytes() == b"a_t2.nii.gz"
    with pytest.raises(KeyError, match="case 'c' of the 'test' split"):
        case_layout({"test": ["c"]}, cases)
    blind = case_layout({"train": ["x"]}, None)
    assert datalist(blind)["training"] == [{"image": "imagesTr/x.nii.gz", "label": "labelsTr/x.nii.gz"}]
    with pytest.raises(FileNotFoundError, match="no source file for imagesTr/x.nii.gz"):
        write_bundle_dataset(blind, tmp_path / "data2")


def test_bundle_calibration_metrics_are_the_papers():
    from pipeline.export.bundle_scripts.evaluation import ForegroundECE
    from pipeline.metrics.calibration import calibration_statistics

    gen = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(3, 4, 9, 8, 5, generator=gen) * 3, 1)
    labels = torch.randint(0, 4, (3, 9, 8, 5), generator=gen)
    labels[2] = 0  # a volume without foreground: no value, skipped by the mean
    onehot = torch.nn.functional.one_hot(labels, 4).movedim(-1, 1).float()
    for classwise in (False, True):
        metric = ForegroundECE(num_bins=15, classwise=classwise)
        values = metric(probs, onehot)[:, 0]
        stats = [calibration_statistics(p, y) for p, y in zip(probs, labels)]
        expected = [s.cece() if classwise else s.ece() for s in stats]
        assert values[:2].tolist() == pytest.approx(expected[:2], abs=1e-12) and torch.isnan(values[2])
        assert float(metric.aggregate()) == pytest.approx(sum(expected[:2]) / 2, abs=1e-7)
    with pytest.raises(ValueError, match="one shape"):
        ForegroundECE()(probs, onehot[:, :3])


def test_guarded_preprocessing_checks_inputs_and_resamples_to_the_training_spacing():
    from pipeline.export.transforms import guarded_preprocessing

    steps = [{"_target_": "LoadImaged", "keys": ["image", "label"]},
             {"_target_": "EnsureChannelFirstd", "keys": ["image", "label"]},
             {"_target_": "Orientationd", "keys": ["image", "label"], "axcodes": "RAS"},
             {"_target_": "ScaleIntensityRanged", "keys": ["image"], "a_min": 0, "a_max": 1, "b_min": 0, "b_max": 1,
              "clip": True}]
    out = guarded_preprocessing(steps, 1, [0.0, 0.8], [2.0, 2.0, 2.0])
    assert [s["_target_"] for s in out] == ["scripts.inputs.ReadImaged", "EnsureChannelFirstd",
                                            "scripts.inputs.CheckImaged", "Orientationd", "Spacingd",
                                            "ScaleIntensityRanged"]
    assert out[2]["training_range"] == [0.0, 0.8] and out[2]["channels"] == 1
    assert out[4] == {"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [2.0, 2.0, 2.0],
                      "mode": ["bilinear", "nearest"]}
    # a per-image normalisation: the scale of the intensities does not matter, so it is not checked
    per_image = guarded_preprocessing([*steps[:3], {"_target_": "ScaleIntensityd", "keys": "image"}], 1, [0, 1], None)
    assert per_image[2]["training_range"] is None and "Spacingd" not in [s["_target_"] for s in per_image]
    # the run's own Spacingd is kept, none added
    own = guarded_preprocessing([*steps, {"_target_": "Spacingd", "keys": ["image"], "pixdim": [1, 1, 1]}], 1,
                                None, [2.0, 2.0, 2.0])
    assert [s["_target_"] for s in own].count("Spacingd") == 1


def test_bundle_input_checks_name_the_file(tmp_path):
    from monai.data import MetaTensor

    from pipeline.export.bundle_scripts.inputs import BundleInputError, CheckImaged, find_images, listed_sha256

    check = CheckImaged("image", channels=1, training_range=[0.0, 1.0])
    image = MetaTensor(torch.rand(1, 8, 8, 4), meta={"filename_or_obj": "/data/a.nii.gz"})
    assert check({"image": image})["image"] is image
    for bad, words in ((image * 1000, r"intensities from .* expected within \[-0.5, 1.5\]"),
                       (image[:, :, :, 0], "a 2D image"), (torch.cat([image, image]), "2 channel"),
                       (torch.where(torch.arange(256).reshape(1, 8, 8, 4) == 5, torch.nan, image), "NaN")):
        bad = MetaTensor(bad, meta={"filename_or_obj": "/data/a.nii.gz"})
        with pytest.raises(BundleInputError, match=f"/data/a.nii.gz: .*{words}"):
            check({"image": bad})
    (tmp_path / "imagesTs").mkdir()
    with pytest.raises(BundleInputError, match="imagesTs: no image to segment"):
        find_images(str(tmp_path / "imagesTs"))
    (tmp_path / "large_files.yml").write_text(json.dumps({"large_files": [
        {"path": "models/model.ts", "hash_val": "ab", "hash_type": "sha256"}]}))
    assert listed_sha256(str(tmp_path), "models/model.ts") == "ab"
    with pytest.raises(BundleInputError, match=r"models/other.ts: no sha256 .*--model_sha256"):
        listed_sha256(str(tmp_path), "models/other.ts")
