"""`make screenshots` without a browser: finding a comparison's parent and child runs in an MLflow store, the UI's
URLs and stored state, the errors when playwright or Chromium is missing, and stopping the UI server."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.parse

import mlflow
import pytest

import pipeline.compare.runner as runner
import pipeline.compare.screenshots as shots
from pipeline.tracking import ensure_experiment


def child(client, exp, parent, method, order, seed, setting="", status="FINISHED", params=None, metrics=None):
    tags = {"mlflow.parentRunId": parent, "compare.id": "as its parent's", "compare.key": f"{method}-{order}-{seed}",
            "compare.method": method, "compare.setting": setting, "compare.order": str(order),
            "compare.seed": str(seed)}
    run = client.create_run(exp, run_name=f"{method}-{setting or 'none'}-s{seed}-{status.lower()}", tags=tags)
    for k, v in {"loss": method, "seed": seed, **(params or {})}.items():
        client.log_param(run.info.run_id, k, v)
    for k, v in (metrics or {"test/ece": 0.1 + 0.01 * seed, "test/dsc": 0.9}).items():
        client.log_metric(run.info.run_id, k, v)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two comparisons in experiment ``compare`` (the first with two parents, as two shards that started together
    leave when neither deletes its own), plus a run of another experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('shots')}/store.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = ensure_experiment(client, shots.EXPERIMENT, uri)
    first = client.create_run(exp, run_name="compare mni/paper", tags={"compare.id": "mni/paper"}).info.run_id
    time.sleep(0.01)
    twin = client.create_run(exp, run_name="compare mni/paper", tags={"compare.id": "mni/paper"}).info.run_id
    time.sleep(0.01)
    newest = client.create_run(exp, run_name="compare mni/paper/epochs=2",
                               tags={"compare.id": "mni/paper/epochs=2"}).info.run_id
    ids = {
        "mbls10_s1": child(client, exp, newest, "mbls", 1, 1, "margin=10", params={"loss.margin": 10}),
        "mbls5_s0": child(client, exp, newest, "mbls", 0, 0, "margin=5", params={"loss.margin": 5}),
        "mbls10_s0_failed": child(client, exp, newest, "mbls", 1, 0, "margin=10", "FAILED", {"loss.margin": 10}),
    }
    time.sleep(0.01)
    ids["mbls10_s0"] = child(client, exp, newest, "mbls", 1, 0, "margin=10", params={"loss.margin": 10})
    ids["ce_s0"] = child(client, exp, newest, "ce", 0, 0)
    ids["old_ce"] = child(client, exp, first, "ce", 0, 0)
    other = ensure_experiment(client, "mbls", uri)
    ids["elsewhere"] = client.create_run(other, tags={"compare.id": "mni/paper"}).info.run_id
    ids["plain"] = client.create_run(exp, run_name="a training of its own").info.run_id
    return client, {"first": first, "twin": twin, "newest": newest, **ids}


def test_the_newest_comparison_is_the_default(store):
    client, ids = store
    assert shots.find_parent(client).info.run_id == ids["newest"]


def test_a_comparison_id_names_its_oldest_parent(store):
    client, ids = store
    assert shots.find_parent(client, "mni/paper").info.run_id == ids["first"]
    assert shots.find_parent(client, "mni/paper/epochs=2").info.run_id == ids["newest"]
    assert shots.find_parent(client, ids["twin"]).info.run_id == ids["twin"]


@pytest.mark.parametrize("which, message", [
    ("mbls5_s0", "is a child run; its comparison's parent run is {newest}"),
    ("elsewhere", "is not a comparison run of experiment 'compare'"),
    ("plain", "is not a comparison run of experiment 'compare'"),
])
def test_a_run_id_that_is_no_parent_is_refused(store, which, message):
    client, ids = store
    with pytest.raises(shots.ScreenshotError, match=re.escape(message.format(**ids))):
        shots.find_parent(client, ids[which])


def test_an_unknown_comparison_lists_the_known_ones(store):
    client, _ = store
    with pytest.raises(shots.ScreenshotError, match=re.escape("expected a parent run id or one of ['mni/paper', "
                                                              "'mni/paper/epochs=2']")):
        shots.find_parent(client, "acdc/paper")
    with pytest.raises(shots.ScreenshotError, match="is not in"):
        shots.find_parent(client, "0" * 32)


def test_a_store_without_comparisons_says_to_run_make_compare(tmp_path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/empty.db")
    with pytest.raises(shots.ScreenshotError, match=re.escape("no experiment 'compare'")):
        shots.find_parent(client)
    ensure_experiment(client, "compare", client.tracking_uri)
    with pytest.raises(shots.ScreenshotError, match=re.escape("run `make compare` first")):
        shots.find_parent(client)


def test_children_are_the_finished_attempts_in_grid_order(store):
    client, ids = store
    children = shots.comparison_children(client, shots.find_parent(client))
    assert [r.info.run_id for r in children] == [ids[k] for k in ("ce_s0", "mbls5_s0", "mbls10_s0", "mbls10_s1")]
    runs, params = shots.method_axes(children, "mbls")
    assert [r.info.run_id for r in runs] == [ids[k] for k in ("mbls5_s0", "mbls10_s0", "mbls10_s1")]
    assert params == ["seed", "loss.margin"]
    assert shots.method_axes(children, "focal") == ([], ["seed"])


def test_flat_axes_and_absent_metrics_are_left_out(store):
    client, _ = store
    children = shots.comparison_children(client, shots.find_parent(client))
    mbls, _ = shots.method_axes(children, "mbls")
    assert shots.present(mbls, ["loss", "loss.margin", "seed"], ["test/ece", "test/cece"]) == \
        (["loss.margin", "seed"], ["test/ece"])
    seed0 = [r for r in mbls if r.data.params["seed"] == "0"]
    assert shots.present(seed0, ["loss.margin", "seed"], ["test/dsc"]) == (["loss.margin"], ["test/dsc"])


def test_the_experiment_is_the_one_make_compare_logs_into():
    assert shots.EXPERIMENT == runner.EXPERIMENT


def test_urls():
    url = shots.runs_table_url("http://127.0.0.1:5000", "3", "mni/paper")
    path, _, query = url.partition("?")
    assert path == "http://127.0.0.1:5000/#/experiments/3/runs"
    assert urllib.parse.parse_qs(query) == {"workflowType": ["machine_learning"],
                                            "searchFilter": ["tags.`compare.id` = 'mni/paper'"]}
    url = shots.compare_url("http://h:1", ["a" * 32, "b" * 32], ["2", "1", "2"])
    path, _, query = url.partition("?")
    assert path == "http://h:1/#/compare-runs"
    q = urllib.parse.parse_qs(query)
    assert json.loads(q["runs"][0]) == ["a" * 32, "b" * 32] and json.loads(q["experiments"][0]) == ["1", "2"]
    with pytest.raises(shots.ScreenshotError, match="no runs to compare"):
        shots.compare_url("http://h:1", [], ["1"])


def test_the_runs_table_state_shows_the_metrics_and_expands_the_parent():
    state = shots.runs_table_state("p" * 32, "mni/paper")
    assert state["runsExpanded"] == {"p" * 32: True}
    assert {"metrics.`test/ece`", "metrics.`val/best_dsc`", "tags.`compare.setting`"} <= set(state["selectedColumns"])
    assert set(state["selectedColumns"]) <= set(state["columnOrder"])
    assert set(state["columnWidths"]) <= set(state["columnOrder"])  # the UI sizes only the columns it orders
    assert state["orderByKey"] == "attributes.start_time"  # the UI nests child runs only when sorted by date
    entries = shots.local_storage("7", "p" * 32, "mni/paper")
    script = shots.init_script(entries)
    calls = re.findall(r'window\.localStorage\.setItem\(("(?:[^"\\]|\\.)*"), ("(?:[^"\\]|\\.)*")\);', script)
    assert {json.loads(k): json.loads(v) for k, v in calls} == entries
    assert json.loads(entries['MLflowLocalStorage-1.1-ExperimentPage-["7"]-ReactComponentState']) == state
    assert entries["mlflow.assistant.panelOpen_v1"] == "false"


def test_missing_playwright_names_the_install_commands(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "playwright.sync_api", None)  # makes the import fail
    with pytest.raises(shots.ScreenshotError, match=re.escape(shots.INSTALL)):
        shots.load_playwright()
    assert shots.main(["--run", "mni/paper"]) == 1
    err = capsys.readouterr().err
    assert "apt-get install -y chromium" in err and ".venv/bin/pip install playwright" in err


def test_missing_chromium_names_the_install_commands(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CHROMIUM", raising=False)
    with pytest.raises(shots.ScreenshotError, match=re.escape("no Chromium executable (chromium or chromium-browser)"
                                                              f": {shots.INSTALL}")):
        shots.find_chromium()
    fake = tmp_path / "my-chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert shots.find_chromium(str(fake)) == str(fake)
    monkeypatch.setenv("CHROMIUM", "my-chromium")
    assert shots.find_chromium() == str(fake)
    with pytest.raises(shots.ScreenshotError, match="no-such-browser"):
        shots.find_chromium("no-such-browser")


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stop_ends_the_server_with_its_workers():
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; sleep 60 & echo $!; wait"], start_new_session=True,
                            stdout=subprocess.PIPE, text=True)
    workers = [int(proc.stdout.readline()) for _ in range(2)]
    assert all(running(p) for p in workers)
    shots.stop(proc)
    assert proc.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 10
    while any(running(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(running(p) for p in workers)
