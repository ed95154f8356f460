"""What a comparison's MLflow store holds: its parent run, its child runs by key, and the tables the report reads.

Every training of a comparison is a child run of one parent run (tag ``mlflow.parentRunId``) carrying its key and
grid coordinates in ``compare.*`` tags. Several attempts may share a key (a failed or killed one, then a finished
one); the report uses the finished attempt when there is one, else the newest.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from pipeline.compare.grid import RunSpec

PARENT_TAG = "compare.id"


def find_or_create_parent(client, experiment_id: str, comparison: str, tags: dict) -> str:
    """The run id of the comparison's parent run, created when missing.

    Shards that start together may each create one; all of them then use the oldest (the same on every shard), and
    a shard deletes the parent it created in vain.
    """

    def parents():
        found = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{comparison}'",
                                   max_results=1000)
        found = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
        return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    existing = parents()
    if existing:
        return existing[0].info.run_id
    created = client.create_run(experiment_id, run_name=f"compare {comparison}", tags={PARENT_TAG: comparison, **tags})
    oldest = parents()[0].info.run_id
    if oldest != created.info.run_id:
        client.delete_run(created.info.run_id)
    return oldest


def child_runs(client, experiment_id: str, parent_id: str) -> dict[str, list]:
    """Key → the child runs of ``parent_id`` with that key, newest first."""
    out: dict[str, list] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
                                  max_results=1000, page_token=token)
        for r in page:
            key = r.data.tags.get("compare.key")
            if key:
                out.setdefault(key, []).append(r)
        token = page.token
        if not token:
            break
    for runs in out.values():
        runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id), reverse=True)
    return out


def finished_elsewhere(client, experiment_id: str, parent_id: str) -> dict[str, list]:
    """Key → the FINISHED runs of the experiment with that key that are not children of ``parent_id``: the same
    training (same resolved config, seed and data) done for another comparison, which this one reuses."""
    out: dict[str, list] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token)
        for r in page:
            key = r.data.tags.get("compare.key")
            if key and r.data.tags.get("mlflow.parentRunId") != parent_id:
                out.setdefault(key, []).append(r)
        token = page.token
        if not token:
            break
    for runs in out.values():
        runs.sort(key=lambda r: (r.info.start_time or 0, r.info.run_id))  # the oldest: the same every time
    return out


def with_reused(children: dict[str, list], elsewhere: dict[str, list], keys) -> dict[str, list]:
    """``children`` completed, for each of ``keys`` without a finished child, by a finished run of that key from
    another comparison (put first, so that it is the attempt the report reads)."""
    out = {k: list(v) for k, v in children.items()}
    for key in keys:
        if any(r.info.status == "FINISHED" for r in out.get(key, [])) or key not in elsewhere:
            continue
        out[key] = [elsewhere[key][0], *out.get(key, [])]
    return out


def best_attempt(attempts: list):
    """The finished attempt if any, else the newest."""
    finished = [r for r in attempts if r.info.status == "FINISHED"]
    return (finished or attempts)[0]


def is_stale(run) -> bool:
    """A RUNNING child whose process is gone: started on this host by a process that no longer exists, or on
    another host (shards are disjoint: nobody else trains this key now, so it was left behind by a dead job)."""
    if run.info.status != "RUNNING":
        return False
    host, pid = run.data.tags.get("compare.host"), run.data.tags.get("compare.pid")
    if host != socket.gethostname() or not pid:
        return True
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return True
    except PermissionError:
        return False
    return int(pid) == os.getpid()


def _artifact(client, run, name: str, folder: Path) -> Path | None:
    """``name`` from the run folder when it is on this machine, else downloaded from the run's artifacts."""
    local = Path(run.data.params.get("run_dir", "")) / name
    if local.is_file():
        return local
    try:
        return Path(client.download_artifacts(run.info.run_id, name, str(folder)))
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def _figure_extras(path: Path | None) -> dict:
    if path is None:
        return {}
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    out: dict = {"reliability": {}}
    for method in ("pre", "ts", "lts"):
        if f"reliability_{method}_edges" in data:
            out["reliability"][method] = {k: data[f"reliability_{method}_{k}"].tolist()
                                          for k in ("edges", "count", "confidence", "accuracy")}
    if "map_image" in data:
        out["confidence_map"] = {k: data[f"map_{k}"] for k in ("image", "label", "pred", "maxprob")}
        out["confidence_map"].update(id=str(data["map_id"]), slice=int(data["map_slice"]))
    if "mean_logits" in data:
        out["mean_logits"] = data["mean_logits"]
    return out


def collect(client, specs: list[RunSpec], children: dict[str, list]) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The report's inputs for ``specs``: one row per run that has a child (finished or not), the per-volume rows
    of finished runs, and the per-run figure arrays. Runs without any child are left out (the report counts them
    as missing)."""
    rows, volumes, extras = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            if spec.key not in children:
                continue
            run = best_attempt(children[spec.key])
            row = {"key": spec.key, "status": run.info.status, "method": spec.method, "backbone": spec.backbone,
                   "setting": spec.setting, "hp_value": math.nan if spec.hp_value is None else spec.hp_value,
                   "order": spec.order, "seed": spec.seed, "run_id": run.info.run_id,
                   "epochs": int(run.data.params.get("epochs", spec.overrides.get("epochs", 0)))}
            if run.info.status == "FINISHED":
                row.update({k: v for k, v in run.data.metrics.items()
                            if k.startswith(("test/", "val/", "test_last/"))})
                csv = _artifact(client, run, "per_volume.csv", Path(tmp) / spec.key)
                if csv is not None:
                    table = pd.read_csv(csv, dtype={"id": str})
                    last = _artifact(client, run, "per_volume_last.csv", Path(tmp) / spec.key)
                    if last is not None:  # the last epoch's weights: columns last_<metric>
                        last_table = pd.read_csv(last, dtype={"id": str}).set_index("id").add_prefix("last_")
                        table = table.join(last_table, on="id")
                    volumes.append(table.assign(key=spec.key))
                extras[spec.key] = _figure_extras(_artifact(client, run, "figure_data.npz", Path(tmp) / spec.key))
            rows.append(row)
    runs = pd.DataFrame(rows)
    return runs, (pd.concat(volumes, ignore_index=True) if volumes else pd.DataFrame(columns=["key", "id"])), extras
