"""``metrics.jsonl``: what a run could not write to MLflow, kept in its run folder until ``make sync-mlflow RUN=…``.

While the tracking store is down (a locked SQLite file, an unreachable server), :class:`pipeline.tracking.RunTracker`
appends each write it gave up on as one JSON line: ``{"run_id", "op", "at", …}`` with ``op`` one of ``metrics``
(``[[key, value, timestamp ms, step], …]``), ``params``, ``tags``, ``artifact`` (a file of the run folder),
``dataset`` or ``status``. :func:`sync_run` replays them in order into the same MLflow run (MLflow ignores a metric
logged twice with the same step, time and value, so a replay can be repeated) and moves them to
``metrics.synced.jsonl``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param

from pipeline.io import write_text_atomic
from pipeline.tracking_store import prepare_store

JOURNAL = "metrics.jsonl"
SYNCED = "metrics.synced.jsonl"
OPS = ("metrics", "params", "tags", "artifact", "dataset", "status")


def append_entry(path: str | os.PathLike, entry: dict) -> None:
    """Append one entry as a JSON line and flush it to disk (a kill right after loses nothing)."""
    line = json.dumps({**entry, "at": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def read_entries(path: str | os.PathLike) -> list[dict]:
    """The entries of a journal; a last line cut by a crash mid-write is dropped.

    Raises:
        ValueError: a broken line that is not the last, or an unknown ``op``, naming the file and line.
    """
    lines = Path(path).read_text().split("\n")
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # no newline after it: a write cut short
                break
            raise ValueError(f"{path}, line {i}: not a JSON object") from None
        if entry.get("op") not in OPS or not entry.get("run_id"):
            raise ValueError(f"{path}, line {i}: expected a run_id and an op in {OPS}, got {line[:120]}")
        out.append(entry)
    return out


def replay(client: mlflow.MlflowClient, entry: dict) -> None:
    """Write one journal entry into its MLflow run."""
    run_id, op = entry["run_id"], entry["op"]
    if op == "metrics":
        items = [Metric(str(k), float(v), int(t), int(s)) for k, v, t, s in entry["metrics"]]
        for i in range(0, len(items), 500):
            client.log_batch(run_id, metrics=items[i : i + 500])
    elif op == "params":  # MLflow refuses to change a parameter: those the run has already are left out
        logged = client.get_run(run_id).data.params
        items = [Param(str(k), str(v)) for k, v in entry["params"].items() if str(k) not in logged]
        for i in range(0, len(items), 100):
            client.log_batch(run_id, params=items[i : i + 100])
    elif op == "tags":
        for k, v in entry["tags"].items():
            client.set_tag(run_id, k, str(v))
    elif op == "artifact":
        if not Path(entry["path"]).exists():
            raise FileNotFoundError(f"the artifact {entry['path']} of run {run_id} is gone; it cannot be synced")
        client.log_artifact(run_id, entry["path"], entry.get("artifact_path"))
    elif op == "dataset":
        dataset = Dataset(name=entry["name"], digest=entry["digest"], source_type="local",
                          source=json.dumps({"uri": entry["source"]}))
        client.log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[InputTag("mlflow.data.context",
                                                                                  entry["context"])])])
    elif op == "status":
        client.set_terminated(run_id, entry["status"])


def _write_lines(path: Path, entries: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(e) + "\n" for e in entries))


def sync_journal(run_dir: str | os.PathLike, uri: str) -> dict:
    """Replay ``run_dir/metrics.jsonl`` into MLflow at ``uri``, then move its lines to ``metrics.synced.jsonl``.

    The journal is first renamed aside, so a training still running may go on appending to a new one. When a write
    fails, the entries not yet written are put back in front of any new ones and the error is raised.

    Returns:
        ``{"entries": n written, "run_ids": [...], "by_op": {op: n}}`` (``entries`` 0 when there was nothing).

    Raises:
        FileNotFoundError: ``run_dir`` is not a folder.
        ValueError: a broken journal (see :func:`read_entries`).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run_dir}")
    journal = run_dir / JOURNAL
    if not journal.is_file():
        return {"entries": 0, "run_ids": [], "by_op": {}}
    syncing = run_dir / f".{JOURNAL}.syncing"
    if syncing.exists():  # an earlier sync died: its entries come first
        entries = read_entries(syncing) + read_entries(journal)
        _write_lines(syncing, entries)
        journal.unlink()
    else:
        os.replace(journal, syncing)
        entries = read_entries(syncing)
    prepare_store(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    by_op: dict[str, int] = {}
    for done, entry in enumerate(entries):
        try:
            replay(client, entry)
        except Exception:
            newer = read_entries(journal) if journal.is_file() else []
            _write_lines(journal, entries[done:] + newer)
            syncing.unlink()
            raise
        by_op[entry["op"]] = by_op.get(entry["op"], 0) + 1
    with open(run_dir / SYNCED, "a") as f:
        f.write("".join(json.dumps(e) + "\n" for e in entries))
    syncing.unlink()
    return {"entries": len(entries), "run_ids": sorted({e["run_id"] for e in entries}), "by_op": by_op}
