"""The MLflow tracking store before a run uses it: checked before any data work, created safely.

* :func:`check_store`: a one-line :class:`TrackingStoreError` naming the store and the cure when it cannot take a run
  (an unreachable server fails in seconds, not after MLflow's 275 s of HTTP retries; a locked, read-only or foreign
  SQLite file is named), and nothing is created when it fails.
* :func:`prepare_store`: the first use of a SQLite store in a process runs under a file lock beside the database
  (``mlruns.db.lock``), so two first runs on a fresh ``mlruns.db`` do not race on MLflow's table creation (one of
  them used to die with ``duplicate column name``). Sessions then wait for each other through MLflow's own SQLite
  busy timeout (20 s); longer outages are :class:`pipeline.tracking.RunTracker`'s business.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path

import mlflow
import requests

from pipeline.locks import FileLock, LockTimeout

#: MLflow's HTTP client retries 7 times with a doubling back-off (275 s) by default: a short leash instead, unless
#: the user set these variables
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
LOCAL_CURE = "or unset MLFLOW_TRACKING_URI to use the local store sqlite:///<repository>/mlruns.db"

_prepared: set[str] = set()


#: the password of a URI's user information: ``scheme://user:PASSWORD@host``
_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^@\s]*@")


def mask_uri(text: str) -> str:
    """``text`` with the password of every URI in it replaced by ``***``: what is printed or stored of a tracking
    URI (a ``MLFLOW_TRACKING_URI`` such as ``postgresql://user:secret@host/db``).

    >>> mask_uri("postgresql://mlflow:s3cret@db.example.org:5432/mlflow")
    'postgresql://mlflow:***@db.example.org:5432/mlflow'
    """
    return _PASSWORD.sub(r"\g<head>:***@", str(text))


class TrackingStoreError(RuntimeError):
    """The MLflow tracking store cannot take a run; the message names the store (its password masked) and the
    cure."""

    def __init__(self, message: str) -> None:
        super().__init__(mask_uri(message))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///…`` URI (``sqlite:////abs/file.db`` is absolute); ``None`` for any other
    store or an in-memory database."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def limit_http_retries() -> None:
    """Set :data:`HTTP_DEFAULTS` in the environment where the user has not set them (MLflow reads them per call)."""
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)


def check_store(uri: str, wait_s: float = 10.0) -> None:
    """Fail fast, with one line naming ``uri`` and the cure, when the store cannot take a run.

    Args:
        uri: the tracking URI (``sqlite:///…``, ``http(s)://…`` or another MLflow store).
        wait_s: how long a SQLite write lock held by another process, or a silent server, is waited for.

    Raises:
        TrackingStoreError: unreachable or refusing server; SQLite file locked, read-only, not a database, or in a
            folder that cannot be written.
    """
    db = sqlite_path(uri)
    if db is not None:
        _check_sqlite(db.resolve(), wait_s)
        return
    limit_http_retries()
    if uri.startswith(("http://", "https://")):
        _check_server(uri, wait_s)
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # any store type: whatever stops it, say so in one line
        if "error code 404" in str(e):
            raise TrackingStoreError(f"{uri} answers, but not as an MLflow tracking server (HTTP 404 on its API): "
                                     f"check the URI, {LOCAL_CURE}") from None
        raise TrackingStoreError(f"the MLflow tracking store {uri} cannot be used ({_reason(e)}): check the URI "
                                 f"and credentials, {LOCAL_CURE}") from None


def _check_server(uri: str, timeout_s: float) -> None:
    try:
        reply = requests.get(uri.rstrip("/") + "/health", timeout=max(1.0, timeout_s))
    except requests.RequestException as e:
        raise TrackingStoreError(
            f"the MLflow tracking server {uri} is unreachable ({_reason(e)}): start it (e.g. `mlflow server "
            f"--backend-store-uri sqlite:///mlruns.db --port 5000`), fix MLFLOW_TRACKING_URI, {LOCAL_CURE}"
        ) from None
    if reply.status_code in (401, 403):
        raise TrackingStoreError(f"the MLflow tracking server {uri} refused the request (HTTP {reply.status_code}): "
                                 "set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")
    if reply.status_code >= 500:
        raise TrackingStoreError(f"the MLflow tracking server {uri} is failing (HTTP {reply.status_code} on /health): "
                                 f"look at the server's log, {LOCAL_CURE}")


def _check_sqlite(db: Path, wait_s: float) -> None:
    cure = "or set MLFLOW_TRACKING_URI=sqlite:///<a writable folder>/mlruns.db"
    if not db.exists():
        folder = next((p for p in db.parents if p.exists()), None)
        if folder is None or not folder.is_dir():
            raise TrackingStoreError(f"cannot create the MLflow store {db}: {folder} is not a folder; {cure}")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise TrackingStoreError(f"cannot create the MLflow store {db}: the folder {folder} is read-only; "
                                     f"make it writable, {cure}")
        return
    if not db.is_file():
        raise TrackingStoreError(f"the MLflow store {db} is not a file; {cure}")
    if not os.access(db, os.R_OK | os.W_OK) or not os.access(db.parent, os.W_OK | os.X_OK):
        raise TrackingStoreError(f"the MLflow store {db} is read-only (the file or its folder): make both writable "
                                 f"(chmod u+w), {cure}")
    try:
        con = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=wait_s)  # mode=rw never creates a file
        try:
            con.execute("BEGIN IMMEDIATE")  # the write lock a run needs: waits up to wait_s for another holder
            con.execute("CREATE TABLE mbls_store_probe (x)")  # a real write (journal file in the folder) ...
            con.rollback()  # ... undone
        finally:
            con.close()
    except sqlite3.OperationalError as e:
        text = str(e)
        if "locked" in text or "busy" in text:
            raise TrackingStoreError(
                f"the MLflow store {db} is locked by another process (still after {wait_s:.0f} s): end or close what "
                f"holds it (a stuck process, an open sqlite3 shell), {cure}") from None
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            raise TrackingStoreError(f"the MLflow store {db} is read-only ({text}): make the file and its folder "
                                     f"writable, {cure}") from None
        raise TrackingStoreError(f"the MLflow store {db} cannot be used ({text}); {cure}") from None
    except sqlite3.DatabaseError as e:
        raise TrackingStoreError(f"{db} is not an MLflow SQLite store ({e}): point MLFLOW_TRACKING_URI at the "
                                 "right file, or move this one away") from None


def store_lock(uri: str, timeout_s: float = 300.0) -> FileLock | None:
    """The creation lock of a SQLite store (``<database>.lock`` beside it); ``None`` for other stores."""
    db = sqlite_path(uri)
    if db is None:
        return None
    db = db.resolve()
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(db.with_name(db.name + ".lock"), timeout_s=timeout_s)


def prepare_store(uri: str) -> None:
    """Open the store once in this process, creating MLflow's tables under :func:`store_lock` for a SQLite store
    (MLflow then keeps the opened store for the process).

    Raises:
        TrackingStoreError: another process held the creation lock for minutes.
    """
    if uri in _prepared:
        return
    lock = store_lock(uri)
    if lock is None:
        limit_http_retries()
    else:
        try:
            lock.acquire()
        except LockTimeout as e:
            raise TrackingStoreError(f"{e}: another process is creating the MLflow store, or hangs doing so") from None
    try:
        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    finally:
        if lock is not None:
            lock.release()
    _prepared.add(uri)


def _reason(e: BaseException) -> str:
    """The short cause inside a long client error (``[Errno 111] Connection refused``, ``timed out``)."""
    text = str(e)
    found = re.search(r"\[Errno -?\d+\][^'\")\]]*", text)
    if found:
        return found.group(0).strip()
    if "timed out" in text.lower():
        return "timed out"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:200]
