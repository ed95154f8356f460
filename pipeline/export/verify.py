"""``make verify-bundle NAME=<name>``: MONAI's own checks of an exported bundle, offline, one line per check.

A bundle's configs (``$`` expressions, ``_target_`` components) and its ``scripts/`` are code: checking that its
workflows build runs that code with this process's rights. So the checks come in two groups. The first reads the
bundle's files and runs none of its code; the second runs its configs and scripts, and runs only with
``trust_code=True`` (``make verify-bundle NAME=… TRUST=1``, ``--trust-code``), for a bundle one trusts (e.g. one
exported here); without it, they are reported as skipped, and the summary says so.

Checks that read files only, in order:

* ``files``: the model zoo's files (``configs/metadata.json``, ``configs/inference.json``, ``models/model.pt``,
  ``docs/README.md``, ``LICENSE``), ``docs/data_license.txt``, and ``large_files.yml`` entries each with a path
  and a sha256 (and no empty ``url``);
* ``sha256``: every file of ``large_files.yml`` exists and has the listed sha256 (a flipped byte fails);
* ``self-contained``: no config and no script imports this project's ``pipeline`` package (read, not imported);
* ``verify_metadata``: ``configs/metadata.json`` against ``bundles/metadata_schema.json`` (no download).

Checks that run the bundle's code (``trust_code``):

* ``verify_net_in_out``: the inference config's ``network_def`` (the backbone of ``models/model.ts``) maps a random
  ``1×C×19×19`` slice to the K output channels of the metadata, in float32;
* ``ckpt_export``: ``models/model.pt`` loaded into ``train.json``'s ``network_def`` exports to TorchScript, and the
  export computes what the shipped model's ``network`` computes;
* ``verify_torchscript`` (the model zoo's check): ``models/model.pt`` loaded into ``inference.json``'s
  ``network_def`` (the padded backbone inside ``model.ts``) exports to TorchScript, and ``model.ts`` loads;
* ``check_properties`` of ``inference.json`` (``infer``), ``evaluate.json`` (``eval``) and ``train.json``
  (``train``): MONAI's bundle properties resolve, on a small synthetic dataset written from
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
#: files every bundle has: the model zoo's necessary and preferred ones, and the data licence
REQUIRED_FILES = ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md", "LICENSE",
                  "docs/data_license.txt", "large_files.yml")
TRUST_HINT = ("they run the bundle's configs and scripts, which are code: pass --trust-code (make verify-bundle "
              "NAME=… TRUST=1) for a bundle you trust")


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


def check_files(bundle_dir: str | Path) -> str:
    """The files every bundle has (:data:`REQUIRED_FILES`) and well-formed ``large_files.yml`` entries.

    Raises:
        FileNotFoundError: a missing file. ValueError: an entry without path or sha256, or with an empty ``url``.
    """
    bundle_dir = Path(bundle_dir)
    missing = [f for f in REQUIRED_FILES if not (bundle_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{bundle_dir}: missing {', '.join(missing)}")
    for entry in large_files(bundle_dir):
        if not entry.get("path") or not entry.get("hash_val"):
            raise ValueError(f"{bundle_dir / 'large_files.yml'}: an entry without path or sha256: {entry}")
        if "url" in entry and not str(entry["url"]).strip():
            raise ValueError(f"{bundle_dir / 'large_files.yml'}: {entry['path']} has an empty url (leave the key out "
                             "for a file shipped in the bundle)")
    return f"{len(REQUIRED_FILES)} required files; large_files.yml entries with path and sha256"


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


def _zoo_torchscript(bundle_dir: Path, out: Path) -> str:
    """The model zoo's ``verify_torchscript``: ``model.pt`` into ``inference.json``'s ``network_def`` exports to
    TorchScript, and ``models/model.ts`` loads."""
    from monai.bundle import ckpt_export

    ckpt_export(net_id="network_def", filepath=str(out / "zoo.ts"), ckpt_file=str(bundle_dir / MODEL_PT),
                meta_file=str(bundle_dir / "configs" / "metadata.json"),
                config_file=str(bundle_dir / "configs" / "inference.json"), bundle_root=str(bundle_dir))
    torch.jit.load(str(bundle_dir / MODEL_TS))
    return "model.pt in inference.json's network_def exports to TorchScript; model.ts loads"


def verify_bundle(bundle: str | Path, schema: str | Path = SCHEMA_FILE, say: Callable[[str], None] = print,
                  trust_code: bool = False) -> list[tuple[str, bool | None, str]]:
    """Run the checks of this module on a bundle (a name under ``bundles/`` or a folder) and ``say`` one line each.

    Args:
        trust_code: also run the checks that execute the bundle's configs and scripts; without it they are
            reported as skipped (``passed`` is ``None``) and nothing of the bundle is imported or evaluated.

    Returns:
        ``[(check, passed (None: skipped), detail)]``.

    Raises:
        FileNotFoundError: no such bundle.
    """
    from monai.bundle import verify_metadata, verify_net_in_out

    bundle_dir = resolve_bundle(bundle)
    meta_file = str(bundle_dir / "configs" / "metadata.json")
    results: list[tuple[str, bool | None, str]] = []

    def run(name: str, check: Callable[[], object]) -> None:
        try:
            results.append((name, True, str(check())))
        except Exception as e:  # noqa: BLE001 - every failure is reported, then the next check runs
            results.append((name, False, f"{type(e).__name__}: {e}"))
        ok, detail = results[-1][1:]
        say(f"{'ok    ' if ok else 'FAILED'} {name}: {detail}")

    def meta_check() -> str:
        verify_metadata(meta_file=meta_file, filepath=str(schema))
        return f"metadata.json matches {schema}"

    monai_loggers = [n for n in logging.root.manager.loggerDict if n.split(".")[0] == "monai"]
    with warnings.catch_warnings(), quiet_loggers(monai_loggers):
        warnings.simplefilter("ignore")
        run("files", lambda: check_files(bundle_dir))
        run("sha256", lambda: ", ".join(check_large_files(bundle_dir)) + ": sha256 as in large_files.yml")
        run("self-contained", lambda: check_self_contained(bundle_dir) or "no config or script imports pipeline")
        run("verify_metadata", meta_check)
        code_checks = ["verify_net_in_out", "ckpt_export", "verify_torchscript", "check_properties inference",
                       "check_properties evaluate", "check_properties train"]
        if not trust_code:
            for name in code_checks:
                results.append((name, None, f"skipped: {TRUST_HINT}"))
                say(f"skip   {name}: not run ({TRUST_HINT.split(':')[0]})")
            return results
        with tempfile.TemporaryDirectory(prefix="verify-bundle-") as tmp, bundle_imports(bundle_dir):
            tmp = Path(tmp)
            data = synthetic_dataset(bundle_dir, tmp / "data")
            run("verify_net_in_out", lambda: verify_net_in_out(
                net_id="network_def", meta_file=meta_file, device="cpu", any=19,
                config_file=str(bundle_dir / "configs" / "inference.json"), bundle_root=str(bundle_dir))
                or "model.ts: input channels → output channels and dtype as in the metadata")
            run("ckpt_export", lambda: _ckpt_export(bundle_dir, tmp))
            run("verify_torchscript", lambda: _zoo_torchscript(bundle_dir, tmp))
            for name, files, kind in (("inference", ["inference.json"], "infer"),
                                      ("evaluate", ["evaluate.json"], "eval"), ("train", ["train.json"], "train")):
                run(f"check_properties {name}", lambda f=files, k=kind, n=name: _workflow_properties(
                    bundle_dir, f, k, data, tmp / n))
    return results


def summary(results: list[tuple[str, bool | None, str]]) -> str:
    """The last line of ``make verify-bundle``: how many checks passed, failed and were skipped."""
    ran = [r for r in results if r[1] is not None]
    failed = [name for name, ok, _ in ran if not ok]
    skipped = [name for name, ok, _ in results if ok is None]
    text = f"{len(ran) - len(failed)} of {len(ran)} checks passed" + (f"; failed: {', '.join(failed)}"
                                                                       if failed else "")
    if skipped:
        text += (f"; {len(skipped)} checks that run the bundle's code were not run ({', '.join(skipped)}): "
                 f"{TRUST_HINT}")
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.export", description=__doc__.split("\n")[0])
    ap.add_argument("bundle", help="bundle name under bundles/, or a bundle folder")
    ap.add_argument("--schema", default=str(SCHEMA_FILE), help="metadata schema file (default: %(default)s)")
    ap.add_argument("--trust-code", action="store_true",
                    help="also run the checks that execute the bundle's configs and scripts (code: only for a bundle "
                    "you trust)")
    args = ap.parse_args(argv)
    try:
        results = verify_bundle(args.bundle, args.schema, trust_code=args.trust_code)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(results))
    return 1 if any(ok is False for _, ok, _ in results) else 0
