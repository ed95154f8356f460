"""Comparison grids (``configs/compare/<name>.yaml``): which losses, hyperparameter values, backbones and seeds a
comparison trains, under which training protocol; their expansion into runs, each with a stable key.

A grid file::

    name: paper
    backbones: [unet]              # every method is trained on each backbone
    seeds: [0, 1, 2, 3, 4]
    reference: mbls                # compared with every other method in the statistics
    baseline: ce
    augmentation: none             # how the report describes the profile
    profile:                       # config overrides of every run: the training protocol
      epochs: 100
      augment: []
    methods:
      - {name: ce, label: CE, loss: ce}
      - {name: mbls, label: MbLS, loss: mbls, params: {alpha: 0.1}, grid: {margin: [5, 8, 10]}}

``extends: <grid>`` starts from another grid file and merges this one into it (mappings merged key by key, other
values replaced); a ``profile`` entry set to ``null`` removes that override (the base config's value applies again).
A method sweeps at most one hyperparameter (``grid``: one name, its values). ``penalties: true`` asks the report
for the paper's Table 4.

A method's ``loss`` is a registered name (``configs/loss/<name>.yaml``) or a loss class defined elsewhere, named by
its import path on the ``PYTHONPATH``: ``loss: {_target_: mypackage.losses.MyLoss}`` (more keys of the mapping are
fixed arguments); ``params`` and ``grid`` then name the class's constructor arguments. The class is called as
``cls(**arguments)`` and the instance as ``loss(logits, labels)`` like the registered losses (``B×K×…`` logits,
``B×1×…`` integer labels); its runs carry the import path as their ``loss`` parameter.

A run's **key** is a hash of its resolved configuration (the merged config with its overrides, without machine
paths and resources), its seed and a fingerprint of the data (the case files and the split): the same training
has the same key on every machine, so finished runs are found and skipped, and shards agree on who trains what.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from pipeline.compare.data import check_methods
from pipeline.config import CONFIG_DIR, available, load_config
from pipeline.registry import check_name

GRID_KEYS = ("name", "backbones", "seeds", "reference", "baseline", "methods")  # required; optional: extends,
# profile, augmentation, penalties, margins (practical-equivalence margins per metric of the verdict)
#: config keys that say where or how a run executes, not what it computes: left out of the key
MACHINE_KEYS = ("output_dir", "data_dir", "cache_dir", "cache", "cache_memory_fraction", "num_workers", "device",
                "experiment_name", "channels_last", "find_unused_parameters", "checkpoint_interval",
                "distributed_timeout", "imports")  # the Python modules the config's expressions may use
#: keys whose expression depends on the machine: the key holds their value on this machine (``amp``: on CUDA only)
RESOLVED_KEYS = ("amp",)


def grid_dir(config_dir: Path | None = None) -> Path:
    return Path(config_dir or CONFIG_DIR) / "compare"


def available_grids(config_dir: Path | None = None) -> list[str]:
    """The names that have a ``configs/compare/<name>.yaml`` file."""
    return sorted(p.stem for p in grid_dir(config_dir).glob("*.yaml"))


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def read_grid(name: str, config_dir: Path | None = None, _seen: tuple = ()) -> dict:
    """The grid file ``name`` (a name under ``configs/compare/`` or a path), with its ``extends`` chain merged.

    Raises:
        pipeline.registry.UnknownNameError: an unknown grid name (with "did you mean …").
        ValueError: an ``extends`` loop, or a file that is not a mapping.
    """
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        path = grid_dir(config_dir) / f"{check_name(name, available_grids(config_dir), 'comparison grid')}.yaml"
    if str(path) in _seen:
        raise ValueError(f"comparison grid {path} extends itself: {' -> '.join(_seen)}")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"comparison grid {path} is not a mapping")
    parent = raw.pop("extends", None)
    if parent:
        raw = _merge(read_grid(parent, config_dir, (*_seen, str(path))), raw)
    return raw


def load_grid(name: str, config_dir: Path | None = None) -> dict:
    """A checked grid: every method's loss exists, sweeps one hyperparameter of it, seeds are whole numbers.

    Raises:
        ValueError: a missing key, an unknown loss or backbone, a parameter the loss lacks, a bad sweep.
    """
    g = read_grid(name, config_dir)
    missing = [k for k in GRID_KEYS if k not in g]
    if missing:
        raise ValueError(f"comparison grid {name!r} lacks {missing}")
    losses, backbones = available("loss", config_dir), available("backbone", config_dir)
    for b in g["backbones"]:
        check_name(str(b), backbones, "backbone")
    if not g["seeds"] or any(not isinstance(s, int) or isinstance(s, bool) for s in g["seeds"]):
        raise ValueError(f"comparison grid {name!r}: seeds must be a non-empty list of whole numbers, got {g['seeds']}")
    g["profile"] = {k: v for k, v in (g.get("profile") or {}).items() if v is not None}
    check_methods(g, f"comparison grid {name!r}", ("name", "label", "loss"))
    for m in g["methods"]:
        if isinstance(m["loss"], dict):
            params = external_loss_parameters(m["loss"], f"comparison grid {name!r}, method {m['name']!r}")
        else:
            check_name(str(m["loss"]), losses, "loss")
            params = yaml.safe_load((Path(config_dir or CONFIG_DIR) / "loss" / f"{m['loss']}.yaml").read_text())["loss"]
        sweep = m.get("grid") or {}
        if len(sweep) > 1:
            raise ValueError(f"comparison grid {name!r}: method {m['name']!r} sweeps {list(sweep)}; one hyperparameter "
                             "per method (make two methods for two)")
        for key in [*(m.get("params") or {}), *sweep]:
            if params is not ANY_PARAMETER and (key not in params or key in ("_target_", "name")):
                valid = [k for k in params if k not in ("_target_", "name")]
                loss = m["loss"]["_target_"] if isinstance(m["loss"], dict) else m["loss"]
                raise ValueError(f"comparison grid {name!r}: loss {loss!r} of method {m['name']!r} has no "
                                 f"parameter {key!r}; its parameters are: {', '.join(valid) or 'none'}")
        for values in sweep.values():
            if not isinstance(values, list) or not values:
                raise ValueError(f"comparison grid {name!r}: method {m['name']!r} sweeps {values!r}; expected a list")
    return g


#: the parameters of a loss class that takes ``**kwargs``: any name
ANY_PARAMETER = object()
#: the registered loss whose config file carries a loss class named by import path (its ``loss`` key replaced)
CARRIER_LOSS = "ce"


def external_loss_parameters(spec: dict, where: str):
    """The constructor arguments of the loss class ``spec["_target_"]`` (an import path), or :data:`ANY_PARAMETER`
    for a class taking ``**kwargs``; the class is imported to check it.

    Raises:
        ValueError: no ``_target_``, a module or class that cannot be imported (naming the path and the error), or
            something that is not a ``torch.nn.Module`` class.
    """
    target = spec.get("_target_")
    if not isinstance(target, str) or "." not in target:
        raise ValueError(f"{where}: a loss given as a mapping needs '_target_: package.module.Class' (the class's "
                         f"import path), got {spec!r}")
    module, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{where}: cannot import the loss class {target!r} ({type(e).__name__}: {e}); is its "
                         "package on the PYTHONPATH?") from None
    if not (inspect.isclass(cls) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"{where}: {target!r} is not a torch.nn.Module class")
    signature = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values()):
        return ANY_PARAMETER
    return [k for k, p in signature.items() if k != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]


@dataclass
class RunSpec:
    """One training of a comparison: a method at one hyperparameter value, on one backbone, with one seed."""

    method: str
    loss: str
    backbone: str
    setting: str  # "margin=5", or "" without a sweep
    hp_name: str | None
    hp_value: float | None
    order: int  # the setting's position in the method's sweep
    seed: int
    overrides: dict = field(default_factory=dict)
    key: str = ""

    @property
    def run_name(self) -> str:
        setting = f"-{self.setting.replace('=', '')}" if self.setting else ""
        return f"{self.method}{setting}-{self.backbone}-s{self.seed}-{self.key[:8]}"

    def tags(self) -> dict[str, str]:
        return {"compare.key": self.key, "compare.method": self.method, "compare.setting": self.setting,
                "compare.backbone": self.backbone, "compare.seed": str(self.seed), "compare.order": str(self.order),
                "compare.hp_value": "" if self.hp_value is None else repr(float(self.hp_value))}


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"0,1,2"`` or ``"0-4,7"`` → the seeds in that order, each once.

    Raises:
        ValueError: anything but whole numbers and ascending ranges, naming the part.

    >>> parse_seeds("0-3,7")
    [0, 1, 2, 3, 7]
    """
    seeds: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        lo, dash, hi = part.partition("-")
        try:
            values = range(int(lo), int(hi) + 1) if dash else [int(part)]
        except ValueError:
            raise ValueError(f"SEEDS: {part!r} is not a whole number or a range like 0-9 (got {text!r})") from None
        if dash and int(hi) < int(lo):
            raise ValueError(f"SEEDS: the range {part!r} is empty (got {text!r})")
        seeds += [v for v in values if v not in seeds]
    return seeds


def expand(grid: dict, seeds: list[int] | None = None, epochs: int | None = None,
           backbones: list[str] | None = None) -> list[RunSpec]:
    """Every run of ``grid`` (backbone × method × setting × seed, in that order), keys not yet set.

    Args:
        seeds, epochs, backbones: replace the grid's seeds, its profile's epochs, its backbones.
    """
    out = []
    profile = dict(grid["profile"])
    if epochs is not None:
        profile["epochs"] = int(epochs)
    for backbone in backbones or grid["backbones"]:
        for m in grid["methods"]:
            sweep = m.get("grid") or {}
            hp_name, values = next(iter(sweep.items())) if sweep else (None, [None])
            for order, value in enumerate(values):
                loss = {**(m.get("params") or {}), **({hp_name: value} if hp_name else {})}
                external = isinstance(m["loss"], dict)
                # a class named by import path replaces the carrier config's loss (and names the run's loss)
                base = {"loss": dict(m["loss"]), "loss_name": m["loss"]["_target_"]} if external else {}
                for seed in seeds if seeds is not None else grid["seeds"]:
                    overrides = {**profile, **base, **{f"loss::{k}": v for k, v in loss.items()}, "seed": int(seed)}
                    out.append(RunSpec(m["name"], CARRIER_LOSS if external else m["loss"], backbone,
                                       f"{hp_name}={value}" if hp_name else "",
                                       hp_name, None if value is None else float(value), order, int(seed), overrides))
    return out


def resolved_config(spec: RunSpec, dataset: str, config_dir: Path | None = None, extra: dict | None = None):
    """The ``ConfigParser`` of a run of the comparison on ``dataset`` (``extra``: machine overrides, e.g. paths)."""
    return load_config(dataset, spec.loss, spec.backbone, {**spec.overrides, **(extra or {})}, config_dir)


def run_key(parser, seed: int, data_fingerprint: str) -> str:
    """The key of a run: sha256 of its merged config (machine keys left out), its seed and the data fingerprint."""
    config = {k: v for k, v in parser.get().items() if k not in MACHINE_KEYS}
    for k in RESOLVED_KEYS:
        if k in config:
            config[k] = parser.get_parsed_content(k)
    text = json.dumps({"config": config, "seed": int(seed), "data": data_fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/n"`` (1 ≤ i ≤ n) → ``(i, n)``; ``None`` → ``(1, 1)``.

    Raises:
        ValueError: anything else, naming the value.
    """
    if not text:
        return 1, 1
    i, sep, n = str(text).partition("/")
    try:
        i, n = int(i), int(n)
    except ValueError:
        i = n = 0
    if not sep or not 1 <= i <= n:
        raise ValueError(f"SHARD must be i/n with 1 <= i <= n (e.g. 2/4), got {text!r}")
    return i, n


def shard(specs: list[RunSpec], i: int, n: int) -> list[RunSpec]:
    """The ``i``-th of ``n`` shards (1-based): every ``n``-th run of the grid's order, starting at the ``i``-th, so
    that each shard holds every method and seed in turn and the shards are about the same size."""
    return specs[i - 1 :: n]
