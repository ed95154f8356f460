"""Run exported bundles as someone who received them does: MONAI's bundle runner, nothing of this project.

The tests start this file with ``python -I`` (no ``PYTHONPATH``, no user site, no script folder on ``sys.path``)
from a folder outside the repository, so that ``pipeline`` cannot be imported; it imports only the standard
library and MONAI. One process runs every job (``import monai`` is the slow part).

Usage: ``python -I bundle_recipient.py <jobs.json> <results.json>`` with jobs
``[{"name", "kind" ("run", the default, or "ckpt_export"), "config_file" (a list of files), "overrides" (config id →
value), "sha256_of" (optional: config id → a file whose sha256 becomes that override, read when the job starts)}]``;
the results are ``{"pipeline_importable": bool, "jobs": {name: {"ok": bool, "error": "<type>: <message> <- <its
cause> …", "seconds": float}}}``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path


def run_jobs(jobs: list[dict]) -> dict:
    from monai.bundle import ckpt_export, run

    results = {"pipeline_importable": importlib.util.find_spec("pipeline") is not None, "jobs": {}}
    for job in jobs:
        for module in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
            del sys.modules[module]  # each bundle brings its own scripts package
        t0 = time.time()
        try:
            overrides = dict(job["overrides"])
            for key, path in job.get("sha256_of", {}).items():
                overrides[key] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            if job.get("kind") == "ckpt_export":
                ckpt_export(config_file=job["config_file"], **overrides)
            else:
                run(run_id="run", config_file=job["config_file"], **overrides)
            outcome = {"ok": True, "error": ""}
        except Exception as e:  # noqa: BLE001 - every failure is reported to the test, with its causes
            chain = [e]
            while chain[-1].__cause__ is not None:
                chain.append(chain[-1].__cause__)
            outcome = {"ok": False, "error": " <- ".join(f"{type(c).__name__}: {c}" for c in chain)}
        results["jobs"][job["name"]] = {**outcome, "seconds": time.time() - t0}
    return results


if __name__ == "__main__":
    jobs_file, results_file = sys.argv[1:3]
    Path(results_file).write_text(json.dumps(run_jobs(json.loads(Path(jobs_file).read_text())), indent=2))
