"""``make verify-bundle NAME=<name>``: MONAI's own checks of an exported bundle, offline, one line per check.

Checks, in order:

* ``sha256``: every file of ``large_files.yml`` exists and has the listed sha256 (a flipped byte fails);
* ``self-contained``: no config and no script imports this project's ``pipeline`` package;
* ``verify_metadata``: ``configs/metadata.json`` against ``bundles/metadata_schema.json`` (no download);
* ``verify_net_in_out``: the inference config's ``network_def`` (``models/model.ts``) maps a random
  ``1×C×19×19`` slice to the K output channels of the metadata, in float32;
* ``ckpt_export``: ``models/model.pt`` loaded into ``train.json``'s ``network_def`` exports to TorchScript, and the
  export computes what the shipped model's ``network`` computes;
* ``check_properties`` of ``inference.json`` (``infer``), ``inference.json`` + ``evaluate.json`` (``eval``) and
  ``train.json`` (``train``): MONAI's bundle properties resolve, on a small synthetic dataset written from
  ``configs/datalist.json``.

MONAI's functions run in this process (each ``python -m monai.bundle`` command would import MONAI again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from pipeline.export.bundle import BUNDLES_DIR, SCHEMA_FILE, sha256
from pipeline.export.configs import MODEL_PT, MODEL_TS
from pipeline.export.mlflow_logging import quiet_loggers
from pipeline.export.scripts import check_self_contained

SYNTHETIC_SHAPE = (32, 32, 6)


class WeightFileError(ValueError):
    """A weight file of a bundle is missing, truncated or altered (its sha256 differs from ``large_files.yml``)."""


def resolve_bundle(bundle: str | Path) -> Path:
    """A bundle folder from a path or a name under ``bundles/``.

    Raises:
        FileNotFoundError: neither exists.
    """
    for candidate in (Path(bundle), BUNDLES_DIR / str(bundle)):
        if (candidate / "configs" / "metadata.json").is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"no bundle '{bundle}': neither {Path(bundle)} nor {BUNDLES_DIR / str(bundle)} holds "
                            "configs/metadata.json")


def large_files(bundle_dir: str | Path) -> list[dict]:
    """The entries of ``large_files.yml`` (JSON-formatted YAML; plain YAML is read too)."""
    path = Path(bundle_dir) / "large_files.yml"
    if not path.is_file():
        raise FileNotFoundError(f"no large_files.yml in {bundle_dir}")
    text = path.read_text()
    try:
        content = json.loads(text)
    except json.JSONDecodeError:
        import yaml

        content = yaml.safe_load(text)
    return list(content["large_files"])


def check_large_files(bundle_dir: str | Path, only: str | None = None) -> list[str]:
    """Check the sha256 of the files of ``large_files.yml`` (or of the one entry ``only``); returns their paths.

    Raises:
        WeightFileError: naming the file and the failing check (missing, or sha256 expected vs found, with sizes).
    """
    bundle_dir = Path(bundle_dir)
    checked = []
    for entry in large_files(bundle_dir):
        if only is not None and entry["path"] != only:
            continue
        path = bundle_dir / entry["path"]
        if str(entry.get("hash_type", "")).lower() != "sha256" or not entry.get("hash_val"):
            raise WeightFileError(f"{path}: large_files.yml gives no sha256 for it")
        if not path.is_file():
            raise WeightFileError(f"{path}: missing (listed in large_files.yml)")
        found = sha256(path)
        if found != entry["hash_val"]:
            raise WeightFileError(f"{path}: sha256 check failed: large_files.yml expects {entry['hash_val']}, the "
                                  f"file ({path.stat().st_size} bytes) has {found}; it is altered or truncated")
        checked.append(entry["path"])
    if only is not None and not checked:
        raise WeightFileError(f"{bundle_dir / only}: not listed in large_files.yml, its sha256 cannot be checked")
    return checked


def load_bundle_weights(bundle_dir: str | Path) -> dict:
    """``models/model.pt`` (the uncalibrated network's state dict), after its sha256 check, ``weights_only``."""
    check_large_files(bundle_dir, MODEL_PT)
    return torch.load(Path(bundle_dir) / MODEL_PT, map_location="cpu", weights_only=True)


def load_bundle_model(bundle_dir: str | Path) -> torch.jit.ScriptModule:
    """``models/model.ts`` (the shipped, calibrated model), after its sha256 check."""
    check_large_files(bundle_dir, MODEL_TS)
    return torch.jit.load(str(Path(bundle_dir) / MODEL_TS), map_location="cpu").eval()


def _purge_scripts() -> None:
    for module in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[module]


@contextlib.contextmanager
def bundle_imports(bundle_dir: str | Path) -> Iterator[None]:
    """Make the bundle's ``scripts`` package importable for the block, as MONAI's runner does (bundle folder on
    ``sys.path``); the ``scripts`` modules of other bundles are forgotten before and after."""
    path = str(Path(bundle_dir).resolve())
    _purge_scripts()
    sys.path.insert(0, path)
    try:
        yield
    finally:
        if path in sys.path:
            sys.path.remove(path)
        _purge_scripts()


def synthetic_dataset(bundle_dir: str | Path, dest: str | Path, shape=SYNTHETIC_SHAPE, seed: int = 0) -> Path:
    """Random images and labels at every path of the bundle's ``configs/datalist.json``, under ``dest``.

    Images have the metadata's input channels (one file per channel for list entries), labels values in
    ``[0, K)``; enough for MONAI's workflows to build and run, not to learn anything.
    """
    import nibabel as nib

    bundle_dir, dest = Path(bundle_dir), Path(dest)
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    fmt = meta["network_data_format"]
    channels, k = int(fmt["inputs"]["image"]["num_channels"]), int(fmt["outputs"]["pred"]["num_channels"])
    rng = np.random.default_rng(seed)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    entries = json.loads((bundle_dir / "configs" / "datalist.json").read_text())
    for item in (e for part in entries.values() for e in part):
        images = item["image"] if isinstance(item["image"], list) else [item["image"]]
        for rel in images:
            c = 1 if len(images) > 1 else channels
            data = rng.random((*shape, c) if c > 1 else shape, dtype=np.float32)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), dest / rel)
        (dest / item["label"]).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(rng.integers(0, k, shape).astype(np.uint8), affine), dest / item["label"])
    return dest


def _workflow_properties(bundle_dir: Path, config_files: list[str], workflow_type: str, data: Path, out: Path) -> str:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(bundle_dir / "configs" / f) for f in config_files],
        meta_file=str(bundle_dir / "configs" / "metadata.json"), logging_file=False, workflow_type=workflow_type,
        bundle_root=str(bundle_dir), dataset_dir=str(data), output_dir=str(out), ckpt_dir=str(out / "models"),
        **({"train#dataset#progress": False, "validate#dataset#progress": False} if workflow_type == "train" else {}))
    workflow.initialize()
    missing = workflow.check_properties()
    if missing:
        raise ValueError(f"missing or misnamed properties: {missing}")
    return f"{' + '.join(config_files)} as '{workflow_type}': every required property resolves"


def _ckpt_export(bundle_dir: Path, out: Path) -> str:
    from monai.bundle import ckpt_export

    target = out / "exported.ts"
    ckpt_export(net_id="network_def", filepath=str(target), ckpt_file=str(bundle_dir / MODEL_PT),
                meta_file=str(bundle_dir / "configs" / "metadata.json"),
                config_file=str(bundle_dir / "configs" / "train.json"), bundle_root=str(bundle_dir))
    exported, shipped = torch.jit.load(str(target)).eval(), load_bundle_model(bundle_dir)
    channels = json.loads((bundle_dir / "configs" / "metadata.json").read_text())[
        "network_data_format"]["inputs"]["image"]["num_channels"]
    x = torch.rand(2, int(channels), 37, 29, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = exported(x), shipped.network(x)
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise ValueError(f"the export of model.pt differs from model.ts's network (largest difference "
                         f"{float((a - b).abs().max()):.3g})")
    return "model.pt in train.json's network_def exports to TorchScript, equal to model.ts's network"


def verify_bundle(bundle: str | Path, schema: str | Path = SCHEMA_FILE, say: Callable[[str], None] = print
                  ) -> list[tuple[str, bool, str]]:
    """Run the checks of this module on a bundle (a name under ``bundles/`` or a folder) and ``say`` one line each.

    Returns:
        ``[(check, passed, detail)]``.

    Raises:
        FileNotFoundError: no such bundle.
    """
    from monai.bundle import verify_metadata, verify_net_in_out

    bundle_dir = resolve_bundle(bundle)
    meta_file = str(bundle_dir / "configs" / "metadata.json")
    results: list[tuple[str, bool, str]] = []
    monai_loggers = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "monai"]
    with tempfile.TemporaryDirectory(prefix="verify-bundle-") as tmp, bundle_imports(bundle_dir), \
            warnings.catch_warnings(), quiet_loggers(monai_loggers):
        warnings.simplefilter("ignore")
        tmp = Path(tmp)
        data = synthetic_dataset(bundle_dir, tmp / "data")

        def meta_check() -> str:
            verify_metadata(meta_file=meta_file, filepath=str(schema))
            return f"metadata.json matches {schema}"

        def net_check() -> str:
            verify_net_in_out(net_id="network_def", meta_file=meta_file, device="cpu", any=19,
                              config_file=str(bundle_dir / "configs" / "inference.json"), bundle_root=str(bundle_dir))
            return "model.ts: input channels → output channels and dtype as in the metadata"

        checks = [
            ("sha256", lambda: ", ".join(check_large_files(bundle_dir)) + ": sha256 as in large_files.yml"),
            ("self-contained", lambda: check_self_contained(bundle_dir) or "no config or script imports pipeline"),
            ("verify_metadata", meta_check),
            ("verify_net_in_out", net_check),
            ("ckpt_export", lambda: _ckpt_export(bundle_dir, tmp)),
            ("check_properties inference", lambda: _workflow_properties(
                bundle_dir, ["inference.json"], "infer", data, tmp / "infer")),
            ("check_properties evaluate", lambda: _workflow_properties(
                bundle_dir, ["inference.json", "evaluate.json"], "eval", data, tmp / "eval")),
            ("check_properties train", lambda: _workflow_properties(
                bundle_dir, ["train.json"], "train", data, tmp / "train")),
        ]
        for name, check in checks:
            try:
                results.append((name, True, str(check())))
            except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
                results.append((name, False, f"{type(e).__name__}: {e}"))
            ok, detail = results[-1][1:]
            say(f"{'ok    ' if ok else 'FAILED'} {name}: {detail}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n")[0])
    ap.add_argument("bundle", help="bundle name under bundles/, or a bundle folder")
    ap.add_argument("--schema", default=str(SCHEMA_FILE), help="metadata schema file (default: %(default)s)")
    args = ap.parse_args(argv)
    try:
        results = verify_bundle(args.bundle, args.schema)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = [name for name, ok, _ in results if not ok]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed" + (f"; failed: {', '.join(failed)}"
                                                                           if failed else ""))
    return 1 if failed else 0
