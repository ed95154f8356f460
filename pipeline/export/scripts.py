"""Vendoring: the project code a bundle's configs need, copied into its ``scripts/`` folder.

Config components of this project (``_target_: pipeline.…``) become ``scripts.<module>.<name>``: the module that
defines the component is copied verbatim into ``scripts/<module>.py``, which is allowed only when that module
imports nothing of this project (the padding wrapper ``pipeline.networks.padding``, the backbones MONAI lacks,
the preprocessing transforms of ``pipeline.data.transforms``). The training loss, built in a run by
``pipeline.losses.build_loss``, becomes the class of the same name in ``scripts/losses.py``, a plain-autograd copy
kept in :mod:`pipeline.export.bundle_scripts.losses`; the bundle's own modules there (``inputs.py``,
``evaluation.py``) are copied when a config names them (:func:`bundle_modules`). Whatever a bundle holds is checked
at the end: no config and no script may import ``pipeline``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.export.transforms import plain_value
from pipeline.losses import LOSSES

BUNDLE_SCRIPTS = Path(__file__).resolve().parent / "bundle_scripts"
PROJECT = "pipeline"
#: a run's loss config builds its loss with this factory; the bundle names the class instead
LOSS_FACTORY = "pipeline.losses.build_loss"
#: registered losses a bundle's training config cannot hold, and why
WITHOUT_BUNDLE_VERSION = {
    "crac": "its multipliers are training state updated by the pipeline's trainer at each epoch's end, which a "
            "bundle's MONAI trainer does not do",
}
#: packages a vendored module needs besides its imports (MONAI imports them lazily)
EXTRA_REQUIREMENTS = {"transunet.py": ("einops",)}


def imported_modules(path: str | Path) -> set[str]:
    """The top-level names of every module that the Python file ``path`` imports (``import a.b`` → ``a``)."""
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def loss_class_names() -> dict[str, str]:
    """``{registry name: class name}`` of every training loss with a bundle version (``{"mbls": "MarginLoss", …}``)."""
    return {name: cls.__name__ for name, cls in LOSSES.items() if name not in WITHOUT_BUNDLE_VERSION}


def loss_config(parser) -> dict:
    """The bundle's ``loss`` entry for a run's ``loss``: ``{"_target_": "scripts.losses.<Class>", **parameters}``.

    A loss given directly as a MONAI or torch component is kept as it is.

    Raises:
        ValueError: an unknown loss name, or a loss of this project not built by ``build_loss``.
    """
    loss = plain_value(parser, dict(parser.get("loss")), "loss")
    target = str(loss.pop("_target_", ""))
    if target != LOSS_FACTORY:
        return {"_target_": target, **loss}
    name = str(loss.pop("name", ""))
    classes = loss_class_names()
    if name in WITHOUT_BUNDLE_VERSION:
        raise ValueError(f"loss '{name}' has no bundle version: {WITHOUT_BUNDLE_VERSION[name]}")
    if name not in classes:
        raise ValueError(f"loss '{name}' has no bundle version; known losses: {', '.join(sorted(classes))}")
    return {"_target_": f"scripts.losses.{classes[name]}", **loss}


def _source_module(target: str) -> tuple[Path, str]:
    """The file that defines the component ``target`` and the component's name there."""
    module, _, attr = target.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot vendor '{target}': it cannot be imported ({e})") from e
    return Path(inspect.getsourcefile(obj)).resolve(), obj.__name__


def vendor_targets(config: Any, files: dict[str, Path], where: str = "") -> Any:
    """``config`` with every ``_target_: pipeline.…`` replaced by ``scripts.<module>.<name>``; the modules to copy
    are added to ``files`` (``{file name in scripts/: source file}``).

    Raises:
        ValueError: a component whose module imports this project (it cannot run without it), two vendored modules
            with the same file name, or a ``$`` expression that uses this project.
    """
    if isinstance(config, Mapping):
        out = {k: vendor_targets(v, files, f"{where}::{k}" if where else str(k)) for k, v in config.items()}
        target = out.get("_target_")
        if isinstance(target, str) and target.split(".")[0] == PROJECT:
            source, name = _source_module(target)
            uses = imported_modules(source) & {PROJECT}
            if uses:
                raise ValueError(f"cannot vendor '{target}' (at {where}) into a bundle: its module {source} imports "
                                 "this project's 'pipeline' package; move it into a module that imports only torch "
                                 "and MONAI")
            previous = files.setdefault(source.name, source)
            if previous != source:
                raise ValueError(f"two vendored modules are both named {source.name}: {previous} and {source}")
            out["_target_"] = f"scripts.{source.stem}.{name}"
        return out
    if isinstance(config, list):
        return [vendor_targets(v, files, f"{where}::{i}") for i, v in enumerate(config)]
    if isinstance(config, str) and config.startswith("$") and f"{PROJECT}." in config:
        raise ValueError(f"cannot export '{where}': its expression {config!r} uses this project's code")
    return config


def uses_scripts(config: Any, module: str) -> bool:
    """Whether a config names a component of ``scripts.<module>``."""
    return f'"scripts.{module}.' in json.dumps(config)


def bundle_modules(configs: Any) -> list[str]:
    """The files of :mod:`pipeline.export.bundle_scripts` (``losses.py``, ``inputs.py``, ``evaluation.py``) whose
    components ``configs`` name as ``scripts.<module>.…``."""
    return sorted(p.name for p in BUNDLE_SCRIPTS.glob("*.py") if p.name != "__init__.py"
                  and uses_scripts(configs, p.stem))


def write_scripts(dest: Path, files: Mapping[str, Path], own: Sequence[str] = ()) -> list[str]:
    """Fill ``dest`` (a bundle's ``scripts/``) with the package file, the vendored modules and the files ``own`` of
    :mod:`pipeline.export.bundle_scripts` (:func:`bundle_modules`); returns the file names written (nothing, and no
    folder, when nothing is needed).

    Raises:
        ValueError: a vendored module named like one of ``own``.
    """
    wanted = dict(files)
    for name in own:
        if name in wanted:
            raise ValueError(f"a vendored module is named {name} ({wanted[name]}), like the bundle's own module")
        wanted[name] = BUNDLE_SCRIPTS / name
    if not wanted:
        return []
    dest.mkdir(parents=True, exist_ok=True)
    wanted["__init__.py"] = BUNDLE_SCRIPTS / "__init__.py"
    for name, source in sorted(wanted.items()):
        shutil.copyfile(source, dest / name)
    return sorted(wanted)


def check_self_contained(bundle_dir: str | Path) -> None:
    """Raise unless nothing in the bundle imports this project: no script imports ``pipeline`` and no config
    names a ``pipeline.…`` component or expression.

    Raises:
        ValueError: naming the file and what it uses.
    """
    bundle_dir = Path(bundle_dir)
    for path in sorted(bundle_dir.rglob("*.py")):
        if PROJECT in imported_modules(path):
            raise ValueError(f"{path} imports the '{PROJECT}' package: the bundle would not run without it")
    for path in sorted((bundle_dir / "configs").glob("*.json")):
        if path.name == "metadata.json":  # descriptions, not code
            continue
        text = path.read_text()
        for needle in (f'"{PROJECT}.', f"${PROJECT}.", f"import {PROJECT}", f" {PROJECT}."):
            if needle in text:
                raise ValueError(f"{path} uses the '{PROJECT}' package ({needle.strip()!r}): the bundle would not "
                                 "run without it")
