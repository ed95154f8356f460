"""``docs/README.md`` of a bundle: the model card, in the sections of MONAI's model zoo."""

from __future__ import annotations

import platform
from collections.abc import Mapping, Sequence

from pipeline.export.metadata import CALIBRATION_TEXT

DATA_LICENSE_MISSING = ("The licence of these data is not recorded by the MbLS pipeline's dataset source; see the "
                        "data source above before redistributing them or this model.")


def data_license(info: Mapping) -> str:
    """``docs/data_license.txt``: the data the network was trained on and their licence (the dataset source's
    ``data_license``, when it has one)."""
    shipped = ("A copy of the run's cases is in data/ (the configs' default dataset_dir).\n\n"
               if info.get("with_data") else "")
    return (f"Training data: {info['data_source']}.\n\n{shipped}"
            f"{info.get('data_license') or DATA_LICENSE_MISSING}\n")


METRIC_NAMES = {"dsc": "DSC (mean over foreground classes)", "asd": "ASD", "ece": "ECE (foreground voxels)",
                "cece": "CECE (classwise)", "nll": "NLL", "brier": "Brier score"}


def _profile_text(info: Mapping) -> tuple[str, str]:
    """(the intensity refusal, the resampling) in words."""
    profile = info.get("profile") or {}
    low_high, spacing = info.get("checked_range"), profile.get("spacing")
    if info.get("per_image_normalisation"):
        intensity = ("(the intensities' scale is not checked: the preprocessing normalises each image by its own "
                     "statistics)")
    elif low_high:
        lo, hi = low_high
        wide = (lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo))
        intensity = (f"or 0.5th-99.5th intensity percentiles outside [{wide[0]:.4g}, {wide[1]:.4g}] (the training "
                     f"images' range [{lo:.4g}, {hi:.4g}] widened by half its width: an image scaled otherwise, "
                     "e.g. ×1000, is refused rather than saturated by the clipping)")
    else:
        intensity = "(intensities are not checked: the export could not read the training images)"
    resample = (f"resampled to the training spacing {' × '.join(f'{v:g}' for v in spacing)} "
                f"{info['distance_unit']} (MONAI `Spacingd`), and the outputs back to the input's grid"
                if spacing else "not resampled (the training images had no single spacing)")
    return intensity, resample


def _steps(steps: Sequence[Mapping]) -> str:
    return ", ".join(f"`{str(s.get('_target_', '?')).split('.')[-1]}`" for s in steps) or "none"


def model_card(meta: Mapping, info: Mapping, *, image_steps: Sequence[Mapping], dropped: Sequence[str],
               train: Mapping, has_diagram: bool, scripts: Sequence[str]) -> str:
    """The model card's Markdown.

    Args:
        meta: the bundle's metadata (:func:`pipeline.export.metadata.metadata`).
        info: what the bundle holds (the ``info`` of the metadata).
        image_steps: the inference preprocessing.
        dropped: preprocessing steps of the run left out of inference (they need the label).
        train: the bundle's ``train.json``.
        has_diagram: whether ``docs/reliability.png`` is there.
        scripts: the files of ``scripts/`` (empty: none).
    """
    name = meta["name"]
    source = meta["data_source"][:1].upper() + meta["data_source"][1:]
    classes = list(info["class_names"])
    k = len(classes)
    unit = info["distance_unit"]
    rows = "\n".join(f"| {METRIC_NAMES[m]}{f' ({unit})' if m == 'asd' else ''} | {v:.4f} |"
                     for m, v in meta["eval_metrics"].items())
    calib = CALIBRATION_TEXT[info["calibration"]] + info["calibration_detail"]
    diagram = ("\n![Reliability diagram of the shipped model on the test volumes](reliability.png)\n"
               if has_diagram else "")
    left_out = "\n".join(f"- {d}" for d in dropped) or "- none"
    loss = train["loss"]
    loss_params = ", ".join(f"{p}={v}" for p, v in loss.items() if p != "_target_") or "defaults"
    scripts_text = (f"`scripts/` holds the code the configs name as `scripts.…` ({', '.join(scripts)}); "
                    "it imports only torch, numpy and MONAI." if scripts else "The bundle needs no code of its own.")
    intensity, resample = _profile_text(info)
    n_cases = info.get("n_cases") or {}
    data_text = ("`data/` holds a copy of the run's cases in this layout (" + ", ".join(
        f"{n} {k}" for k, n in n_cases.items()) + "), so the commands below run as they are."
                 if info.get("with_data") else "The MbLS pipeline writes a run's cases in this layout: "
                 "`make export RUN=<run> ARGS=\"--data-dir <dataset_dir>\"`.")
    packages = ", ".join(f"{k} {v}" for k, v in {"monai": meta["monai_version"], "torch": meta["pytorch_version"],
                                                 "numpy": meta["numpy_version"],
                                                 **meta["required_packages_version"]}.items())
    calibration_choice = info.get("calibration_reason") or ""
    return f"""# {name}

## Model Overview

{meta['description']}

- task: {meta['task']}
- network: 2D {info['backbone']} (`models/model.ts`: padding to the network's stride, backbone, {calib})
- exported from run `{info['run_name']}` (MLflow run `{info['run_id'] or '-'}`) of the MbLS pipeline
- bundle version {meta['version']}

## Data

{source}. Classes: {', '.join(f'{i} {c}' for i, c in enumerate(classes))}.

The configs read NIfTI files below `dataset_dir` (default `<bundle>/data`): images to segment in `imagesTs/`;
for evaluation and training, the cases of `configs/datalist.json` (the run's split: `training` and `validation`
in `imagesTr/` + `labelsTr/`, `test` in `imagesTs/` + `labelsTs/`). {data_text} Licence of the data:
`docs/data_license.txt`.

## Training configuration

Loss `{loss['_target_'].split('.')[-1]}` ({loss_params}); Adam, learning rate {train['learning_rate']} multiplied by
{train['lr_gamma']} after half of the {train['epochs']} epochs; batch size {train['batch_size']}; best checkpoint by
validation DSC every {train['val_interval']} epochs; seed {train['seed']}. The network sees 2D slices along axis
{info['slice_axis']} of the preprocessed volumes. `configs/train.json` draws each training volume
{train['slices_per_volume']} times per epoch in random order (as many slices as the run's epochs held), takes one
random slice per draw (MONAI `RandSpatialCropd`) and applies the run's augmentation
({_steps(train['train']['random_transforms'][2:])}). {scripts_text}

### Input

One NIfTI volume per file with {info['in_channels']} channel(s) (several channels: a 4D NIfTI, channels last).
Preprocessing: {_steps(image_steps)}. Images are checked before use (`scripts/inputs.py`); each of these stops
the run with an error naming the file: a file that cannot be read (e.g. truncated), no image in `imagesTs/`, another
number of channels, not a 3D volume, a NaN or infinite voxel {intensity}.
Images are {resample}.
Steps of the run's preprocessing left out at inference (they need the label):
{left_out}

### Output

Per input `<image>.nii.gz`, in `output_dir` (default `<bundle>/eval`), in the input's geometry:

| file | content | values |
|---|---|---|
| `<image>_seg.nii.gz` | segmentation (argmax of the probabilities), uint8 | 0 … {k - 1} |
| `<image>_prob.nii.gz` | calibrated class probabilities (softmax of the logits), one per class | [0, 1], sum 1 |
| `<image>_confidence.nii.gz` | max-probability (confidence) map | [1/{k}, 1] |
| `<image>_entropy.nii.gz` | entropy of the class probabilities, in nats | [0, ln {k}] |

`models/model.ts` itself returns calibrated logits (`pred` in `configs/metadata.json`), unbounded.

## Performance

Test metrics of the shipped model (with its calibration), mean over the run's test volumes
(`eval_metrics` of `configs/metadata.json`); `configs/evaluate.json` on the same cases reports DSC, ECE and CECE
as `test_mean_dice`, `test_foreground_ece` and `test_cece`. Calibration: {calibration_choice}.

| metric | value |
|---|---|
{rows}
{diagram}
## MONAI Bundle Commands

Needs {packages} (`configs/metadata.json`). Run from the bundle folder (or add `--bundle_root <bundle>`); the
configs and `scripts/` are code that these commands run:

```bash
# inference on dataset_dir/imagesTs/*.nii(.gz), outputs in output_dir
python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/data --output_dir out
# evaluation on the test cases of configs/datalist.json: metrics.csv and per-case *_raw.csv in output_dir
python -m monai.bundle run --config_file configs/evaluate.json --dataset_dir /path/to/data --output_dir out
# training (from scratch) on the training/validation cases of configs/datalist.json; best weights (validated every
# val_interval epochs and at the last one) in models/retrained/model.pt; the shipped models/ files stay as they are
python -m monai.bundle run --config_file configs/train.json --dataset_dir /path/to/data
# the retrained (uncalibrated) network as TorchScript, and inference with it (its sha256 given, as it has no
# entry in large_files.yml)
python -m monai.bundle ckpt_export network_def --filepath models/retrained/model.ts \\
    --ckpt_file models/retrained/model.pt --meta_file configs/metadata.json --config_file configs/train.json
python -m monai.bundle run --config_file configs/inference.json --model_file models/retrained/model.ts \\
    --model_sha256 $(sha256sum models/retrained/model.ts | cut -c1-64) --dataset_dir /path/to/data --output_dir out2
```

`models/model.ts` is loaded only after its sha256 matches `large_files.yml` (a JSON-formatted YAML file, read
without PyYAML); a changed or truncated file stops the run with MONAI's `HashCheckError` naming it.
`models/model.pt` holds the uncalibrated network's state dict (the `network_def` of `configs/train.json`).

## Limitations

- Trained on {info['data_source']}: {sum(n_cases.values()) if n_cases else 'a few'} volumes in all
  ({', '.join(f'{n} {k}' for k, n in n_cases.items())}). Images unlike them (another scanner, contrast, field of
  view, anatomy or registration) are not refused unless a check above catches them, and may be segmented poorly
  with confident probabilities.
- A 2D network applied slice by slice along axis {info['slice_axis']}; it sees no context across slices.
- Calibration was fitted on the run's validation volumes; its effect on other data is not measured.
- Research only; not for clinical use.

## System configuration

Exported with Python {platform.python_version()} on {platform.system()} {platform.machine()}; trained by the MbLS
pipeline (MLflow run `{info['run_id'] or '-'}`). Inference, evaluation and training run on a CPU or one CUDA GPU
(`cuda:0` when available); the test volumes take seconds on a CPU.

## References

{chr(10).join(f'- {r}' for r in meta['references'])}

## License

Apache License 2.0 (`LICENSE`). {meta['intended_use']}
"""
