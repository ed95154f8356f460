"""The configs of an exported bundle, in model-zoo style: ``inference.json``, ``evaluate.json``, ``train.json``.

* ``inference.json`` reads NIfTI images from ``dataset_dir/imagesTs``, applies the run's image preprocessing,
  runs the TorchScript model ``models/model.ts`` (padding, backbone, calibration; loaded after MONAI's sha256
  check against ``large_files.yml``) slice by slice with MONAI's ``SliceInferer``, inverts the preprocessing and
  writes per input the segmentation, the calibrated class probabilities, the max-probability (confidence) map
  and the entropy map, in the input's geometry. MONAI components only.
* ``evaluate.json`` (alone, or layered on ``inference.json`` or ``train.json``): labelled test cases from
  ``configs/datalist.json``, DSC (``MeanDice``), the paper's foreground ECE and CECE and MONAI's calibration error,
  per-case CSV files with class-named columns.
* inference and evaluation read images through the input checks of ``scripts/inputs.py`` (file, channels,
  dimensions, finite values, intensity range) and resample them to the training spacing.
* ``train.json`` retrains the network from ``configs/datalist.json`` (``training`` and ``validation``) with
  MONAI's ``SupervisedTrainer``: the run's preprocessing cached per volume, random 2D slices with the run's
  augmentation, the run's loss, Adam with the run's step schedule, best checkpoint by validation DSC. Each draw of
  a volume gives one random slice; a ``RandomSampler`` draws the volumes in random order, each
  ``slices_per_volume`` times per epoch, so that an epoch holds as many slices as the run's and a batch of
  ``batch_size`` slices mixes volumes.

Config ids follow MONAI's bundle properties (``bundle_root``, ``dataset_dir``, ``network_def``, ``inferer``,
``train#trainer``, ``validate#evaluator``, …) so that ``ConfigWorkflow.check_properties`` passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"
MODEL_TS = "models/model.ts"
MODEL_PT = "models/model.pt"
#: the outputs ``inference.json`` writes per input image, by file postfix
OUTPUT_POSTFIXES = ("seg", "prob", "confidence", "entropy")
DEVICE = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
FROM_PRED_LABEL = "$monai.handlers.from_engine(['pred', 'label'])"


#: the bundle folder first on ``sys.path`` (the ``scripts`` package found is this bundle's)
BUNDLE_ON_PATH = "$sys.path.insert(0, os.path.abspath(@bundle_root)) or True"


def with_scripts_on_path(component: Mapping) -> dict:
    """``component`` (a ``_target_`` dict) that first puts the bundle folder on ``sys.path`` (config id
    ``scripts_on_path``), so that its ``scripts.…`` targets import wherever the config is read."""
    out = {"_target_": component["_target_"], "_requires_": "@scripts_on_path"}
    out.update({k: v for k, v in component.items() if k != "_target_"})
    return out


def logging_conf() -> str:
    """The bundle's ``configs/logging.conf`` (Python logging to stdout, as in MONAI's model zoo)."""
    return (TEMPLATES / "logging.conf").read_text()


def _save(key: str, postfix: str, dtype: str = "$numpy.float32") -> dict:
    return {"_target_": "SaveImaged", "keys": key, "output_dir": "@output_dir", "output_postfix": postfix,
            "output_dtype": dtype, "resample": False, "separate_folder": False, "print_log": False}


def _slice_inferer(slice_axis: int) -> dict:
    # roi_size -1: each window is a whole slice; the model pads slices to its stride itself
    return {"_target_": "SliceInferer", "roi_size": [-1, -1], "spatial_dim": int(slice_axis), "sw_batch_size": 32,
            "progress": False}


def inference_config(image_steps: Sequence[Mapping], slice_axis: int) -> dict:
    """``configs/inference.json``.

    Args:
        image_steps: the run's preprocessing of the image (plain transform configs).
        slice_axis: the spatial axis (0-2) the 2D network is applied along.
    """
    post = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "CopyItemsd", "keys": "pred", "times": 3, "names": ["prob", "confidence", "entropy"]},
        {"_target_": "Lambdad", "keys": "confidence", "func": "$lambda p: p.max(dim=0, keepdim=True).values"},
        {"_target_": "Lambdad", "keys": "entropy", "func": "$lambda p: torch.special.entr(p).sum(dim=0, keepdim=True)"},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        _save("pred", "seg", "$numpy.uint8"),
        _save("prob", "prob"),
        _save("confidence", "confidence"),
        _save("entropy", "entropy"),
    ]
    return {
        **_model_and_data(image_steps, slice_axis),
        # the images to segment; an empty or missing folder stops with an error naming it
        "images": {"_target_": "scripts.inputs.find_images", "folder": "$os.path.join(@dataset_dir, 'imagesTs')"},
        "datalist": "$[{'image': i} for i in @images]",
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": _evaluator(),
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def _evaluator(**more) -> dict:
    return {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
            "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
            "val_handlers": "@handlers", **more}


def _model_and_data(steps: Sequence[Mapping], slice_axis: int) -> dict:
    """The ids inference and evaluation share: paths, the hash-checked TorchScript model, data, inferer."""
    return {
        "imports": ["$import os", "$import sys", "$import numpy", "$import torch", "$import monai"],
        "bundle_root": ".",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "device": DEVICE,
        "scripts_on_path": BUNDLE_ON_PATH,
        "model_file": MODEL_TS,
        # its entry in large_files.yml (a file without one stops with an error naming it); a model you made
        # yourself (ckpt_export of retrained weights): pass --model_sha256 <its sha256sum>
        "model_sha256": {"_target_": "scripts.inputs.listed_sha256", "_requires_": "@scripts_on_path",
                         "bundle_root": "@bundle_root", "path": "@model_file"},
        # MONAI's download_url only checks the sha256 of a file that exists (and raises HashCheckError naming it)
        "verified_model_file": "$monai.apps.utils.download_url(url='', filepath=os.path.join(@bundle_root, "
                               "@model_file), hash_val=@model_sha256, hash_type='sha256') or "
                               "os.path.join(@bundle_root, @model_file)",
        # the shipped model: network_def (the padded backbone, whose weights models/model.pt holds, as the model
        # zoo's ckpt_export and verify_torchscript expect) followed by the calibration step
        "shipped_model": "$torch.jit.load(@verified_model_file, map_location='cpu')",
        "network_def": "$@shipped_model.network",
        "network": "$@shipped_model.to(@device).eval()",
        "preprocessing": {"_target_": "Compose", "transforms": list(steps)},
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": _slice_inferer(slice_axis),
    }


def _onehot_post(num_classes: int, keep_prob: bool) -> dict:
    steps = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}]
    if keep_prob:
        steps.append({"_target_": "CopyItemsd", "keys": "pred", "names": "prob"})
    steps.append({"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False],
                  "to_onehot": int(num_classes)})
    return {"_target_": "Compose", "transforms": steps}


def _dice(name: str) -> dict:
    return {name: {"_target_": "MeanDice", "include_background": False, "output_transform": FROM_PRED_LABEL}}


def _datalist(key: str) -> str:
    return f"$monai.data.load_decathlon_datalist(@datalist_file, True, '{key}', @dataset_dir)"


def _paper_metric(classwise: bool, n_bins: int) -> dict:
    return {"_target_": "IgniteMetricHandler", "metric_fn": {"_target_": "scripts.evaluation.ForegroundECE",
                                                             "num_bins": int(n_bins), "classwise": classwise},
            "output_transform": "$monai.handlers.from_engine(['prob', 'label'])"}


def evaluate_config(labelled_steps: Sequence[Mapping], class_names: Sequence[str], slice_axis: int,
                    n_bins: int = 15) -> dict:
    """``configs/evaluate.json``: the shipped model on the labelled ``test`` cases of ``configs/datalist.json``
    (workflow type ``eval``). It defines every id it uses, so that it runs alone, layered on ``inference.json``
    or, as model-zoo bundles do, on ``train.json``.

    Metrics: ``test_mean_dice`` (MONAI's ``MeanDice`` over the foreground classes), ``test_foreground_ece`` and
    ``test_cece`` (the paper's, :mod:`pipeline.export.bundle_scripts.evaluation`: the ``ece`` and ``cece`` of the
    bundle's ``eval_metrics``), ``test_calibration_error`` (MONAI's ``CalibrationError``, every voxel per
    foreground class). ``metrics.csv`` holds the means, ``<metric>_raw.csv`` one row per case, columns named by
    class.

    Args:
        labelled_steps: the bundle's preprocessing of image and label.
        class_names: the K class names (the first is the background).
        slice_axis: the spatial axis (0-2) the 2D network is applied along.
        n_bins: calibration bins (default 15, the paper's).
    """
    num_classes = len(class_names)
    details = ["test_mean_dice", "test_foreground_ece", "test_cece"]
    return {
        **_model_and_data(labelled_steps, slice_axis),
        "datalist_file": "$os.path.join(@bundle_root, 'configs', 'datalist.json')",
        "datalist": _datalist("test"),
        "postprocessing": _onehot_post(num_classes, keep_prob=True),
        "key_metric": _dice("test_mean_dice"),
        "additional_metrics": {
            "test_foreground_ece": _paper_metric(False, n_bins),
            "test_cece": _paper_metric(True, n_bins),
            "test_calibration_error": {
                "_target_": "CalibrationError", "num_bins": int(n_bins), "include_background": False,
                "output_transform": "$monai.handlers.from_engine(['prob', 'label'])"}},
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {"_target_": "scripts.evaluation.NamedMetricsSaver", "save_dir": "@output_dir",
             "metrics": [*details, "test_calibration_error"], "metric_details": details,
             "class_names": {"test_mean_dice": [str(c) for c in class_names[1:]], "test_foreground_ece": ["ece"],
                             "test_cece": ["cece"]},
             "batch_transform": "$lambda x: [xx['image'].meta for xx in x]", "summary_ops": "*"},
        ],
        "evaluator": _evaluator(key_val_metric="@key_metric", additional_metrics="@additional_metrics"),
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }


def train_config(labelled_steps: Sequence[Mapping], random_steps: Sequence[Mapping], network_def: Mapping,
                 loss: Mapping, num_classes: int, slice_axis: int, hyper: Mapping) -> dict:
    """``configs/train.json``.

    Args:
        labelled_steps: the run's deterministic preprocessing of image and label (cached per volume).
        random_steps: a random 2D slice of a volume, then the run's augmentation.
        network_def: the padded backbone (components of this project not yet vendored).
        loss: the loss entry (``scripts.losses.<Class>`` with its parameters).
        num_classes: ``K``.
        slice_axis: the spatial axis slices are taken along (validation runs the network along it).
        hyper: ``seed``, ``epochs``, ``val_interval``, ``batch_size``, ``learning_rate``, ``lr_gamma``,
            ``slices_per_volume`` (training slices per volume, for the epoch length), ``num_workers`` (the run's
            values).
    """
    keys = ("seed", "epochs", "val_interval", "batch_size", "learning_rate", "lr_gamma", "slices_per_volume",
            "num_workers")
    return {
        "imports": ["$import glob", "$import os", "$import sys", "$import torch", "$import monai", "$import ignite"],
        "bundle_root": ".",
        # scripts.* importable also where MONAI's runner does not add the bundle folder to sys.path (ckpt_export,
        # verify_net_in_out, python -I): network_def requires it first
        "scripts_on_path": BUNDLE_ON_PATH,
        "ckpt_dir": "$os.path.join(@bundle_root, 'models', 'retrained')",
        "output_dir": "$os.path.join(@bundle_root, 'eval')",
        "dataset_dir": "$os.path.join(@bundle_root, 'data')",
        "datalist_file": "$os.path.join(@bundle_root, 'configs', 'datalist.json')",
        "train_datalist": _datalist("training"),
        "val_datalist": _datalist("validation"),
        **{k: hyper[k] for k in keys},
        "device": DEVICE,
        "network_def": with_scripts_on_path(network_def),
        "network": "$@network_def.to(@device)",
        "loss": dict(loss),
        "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": "@learning_rate"},
        "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.StepLR", "optimizer": "@optimizer",
                         "step_size": "$max(1, @epochs // 2)", "gamma": "@lr_gamma"},
        "train": {
            "deterministic_transforms": list(labelled_steps),
            "random_transforms": list(random_steps),
            "preprocessing": {"_target_": "Compose",
                              "transforms": "$@train#deterministic_transforms + @train#random_transforms"},
            "dataset": {"_target_": "CacheDataset", "data": "@train_datalist", "transform": "@train#preprocessing",
                        "cache_rate": 1.0, "num_workers": "@num_workers"},
            "sampler": {"_target_": "torch.utils.data.RandomSampler", "data_source": "@train#dataset",
                        "num_samples": "$len(@train_datalist) * @slices_per_volume"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": "@batch_size",
                           "sampler": "@train#sampler", "num_workers": "@num_workers"},
            "inferer": {"_target_": "SimpleInferer"},
            "handlers": [
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": False},
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                # validation (and so the best weights' checkpoint) also at the last epoch, whatever --epochs is;
                # never when the interval already ends there (epochs + 1 is never reached)
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "$@epochs if @epochs % @val_interval else @epochs + 1"},
                {"_target_": "StatsHandler", "tag_name": "train_loss",
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
            ],
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@epochs", "device": "@device",
                        "train_data_loader": "@train#dataloader", "network": "@network", "loss_function": "@loss",
                        "optimizer": "@optimizer", "inferer": "@train#inferer", "train_handlers": "@train#handlers"},
        },
        "validate": {
            "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
            "dataset": {"_target_": "CacheDataset", "data": "@val_datalist", "transform": "@validate#preprocessing",
                        "cache_rate": 1.0, "num_workers": "@num_workers"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1,
                           "shuffle": False, "num_workers": "@num_workers"},
            "inferer": _slice_inferer(slice_axis),
            "postprocessing": _onehot_post(num_classes, keep_prob=False),
            "handlers": [
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"},
                 "save_key_metric": True, "key_metric_filename": "model.pt"},
            ],
            "key_metric": _dice("val_mean_dice"),
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device",
                          "val_data_loader": "@validate#dataloader", "network": "@network",
                          "inferer": "@validate#inferer", "postprocessing": "@validate#postprocessing",
                          "key_val_metric": "@validate#key_metric", "val_handlers": "@validate#handlers"},
        },
        "initialize": ["$monai.utils.set_determinism(seed=@seed)"],
        "run": ["$@train#trainer.run()"],
    }
