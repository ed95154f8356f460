"""``docs/README.md`` of a bundle: the model card, in the sections of MONAI's model zoo."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pipeline.export.metadata import CALIBRATION_TEXT

METRIC_NAMES = {"dsc": "DSC (mean over foreground classes)", "asd": "ASD", "ece": "ECE (foreground voxels)",
                "cece": "CECE (classwise)", "nll": "NLL", "brier": "Brier score"}


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
    scripts_text = (f"`scripts/` holds the code `configs/train.json` names as `scripts.…` ({', '.join(scripts)}); "
                    "it imports only torch and MONAI." if scripts else "The bundle needs no code of its own.")
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
in `imagesTr/` + `labelsTr/`, `test` in `imagesTs/` + `labelsTs/`). The MbLS pipeline writes a run's cases in
this layout: `make export RUN=<run> ARGS="--data-dir <dataset_dir>"`.

## Training configuration

Loss `{loss['_target_'].split('.')[-1]}` ({loss_params}); Adam, learning rate {train['learning_rate']} multiplied by
{train['lr_gamma']} after half of the {train['epochs']} epochs; batch size {train['batch_size']}; best checkpoint by
validation DSC every {train['val_interval']} epochs; seed {train['seed']}. The network sees 2D slices along axis
{info['slice_axis']} of the preprocessed volumes. `configs/train.json` draws each training volume
{train['slices_per_volume']} times per epoch in random order (as many slices as the run's epochs held), takes one
random slice per draw (MONAI `RandSpatialCropd`) and applies the run's augmentation
({_steps(train['train']['random_transforms'][2:])}). {scripts_text}

### Input

One NIfTI volume per file with {info['in_channels']} channel(s). Preprocessing: {_steps(image_steps)}.
Steps of the run's preprocessing left out at inference (they need the label):
{left_out}

### Output

Per input `<image>.nii.gz`, in `output_dir` (default `<bundle>/eval`), in the input's geometry:

| file | content | values |
|---|---|---|
| `<image>_seg.nii.gz` | segmentation (argmax of the probabilities), uint8 | 0 … {k - 1} |
| `<image>_prob.nii.gz` | calibrated class probabilities, one channel per class | [0, 1], summing to 1 |
| `<image>_confidence.nii.gz` | max-probability (confidence) map | [1/{k}, 1] |
| `<image>_entropy.nii.gz` | entropy of the class probabilities, in nats | [0, ln {k}] |

## Performance

Test metrics of the shipped model (with its calibration), mean over the run's test volumes
(`eval_metrics` of `configs/metadata.json`):

| metric | value |
|---|---|
{rows}
{diagram}
## MONAI Bundle Commands

Needs `monai`, `torch`, `nibabel`, `pytorch-ignite` and `fire` (versions in `configs/metadata.json`). Run from the
bundle folder (or add `--bundle_root <bundle>`):

```bash
# inference on dataset_dir/imagesTs/*.nii.gz, outputs in output_dir
python -m monai.bundle run --config_file configs/inference.json --dataset_dir /path/to/data --output_dir out
# evaluation on the test cases of configs/datalist.json: DSC and MONAI's calibration error, CSV files in output_dir
python -m monai.bundle run --config_file "['configs/inference.json','configs/evaluate.json']" \\
    --dataset_dir /path/to/data --output_dir out
# training (from scratch) on the training/validation cases of configs/datalist.json; best weights in
# models/retrained/model.pt (the shipped models/ files are left as they are)
python -m monai.bundle run --config_file configs/train.json --dataset_dir /path/to/data
# the retrained (uncalibrated) network as TorchScript
python -m monai.bundle ckpt_export network_def --filepath models/retrained/model.ts \\
    --ckpt_file models/retrained/model.pt --meta_file configs/metadata.json --config_file configs/train.json
```

`models/model.ts` is loaded only after its sha256 matches `large_files.yml` (a JSON-formatted YAML file, read
without PyYAML); a changed or truncated file stops the run with MONAI's `HashCheckError` naming it.
`models/model.pt` holds the uncalibrated network's state dict (the `network_def` of `configs/train.json`).

## References

{chr(10).join(f'- {r}' for r in meta['references'])}

## License

Apache License 2.0 (`LICENSE`). {meta['intended_use']}
"""
