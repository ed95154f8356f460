"""``make screenshots``: pictures of a comparison as the MLflow UI shows it, for the README.

``python -m pipeline.compare.screenshots [--run <parent run id | comparison id>] [--out docs/img]`` finds the
comparison's parent run in the ``compare`` experiment (default: the newest), serves the MLflow UI on a free port of
127.0.0.1 (as ``make ui``), drives a headless Chromium over it and saves:

- ``runs_table.png``: the runs table of the experiment, filtered to the comparison, the parent run expanded over its
  child runs, with the method, setting and seed tags and the validation and test metrics as columns;
- ``compare_view.png``: the compare-runs page of the child runs, its parallel-coordinates plot showing the seed and
  loss against ``val/best_dsc``, ``test/dsc``, ``test/cece`` and ``test/ece`` (coloured by ``test/ece``);
- ``parallel_coordinates.png``: that plot alone, for the child runs of one method (``--method``, default ``mbls``)
  with the seed and its hyperparameter (e.g. ``loss.margin``) as axes.

A parameter with one value among the runs (one seed) gets no axis.

The browser is Debian's ``chromium`` driven by PyPI's ``playwright`` (no browser download); neither is a dependency
of the project: ``apt-get install -y chromium`` and ``.venv/bin/pip install playwright``. The UI's own state (the
columns, the expanded parent, the closed assistant panel) is set through its local storage before the page loads;
the layout is the one of MLflow 3.17.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from pipeline.compare.collect import PARENT_TAG, best_attempt, child_runs
from pipeline.config import REPO_ROOT
from pipeline.tracking import tracking_uri

#: the experiment ``make compare`` logs into (:data:`pipeline.compare.runner.EXPERIMENT`)
EXPERIMENT = "compare"
PARENT_ID_TAG = "mlflow.parentRunId"
INSTALL = "apt-get install -y chromium && .venv/bin/pip install playwright"
#: headless Chromium without the background connections (updates, sync, metrics) that have nowhere to go
BROWSER_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync")
TAG_COLUMNS = ("compare.method", "compare.setting", "compare.seed")
METRIC_COLUMNS = ("val/best_dsc", "test/dsc", "test/ece", "test/cece", "test/ts/ece", "test/lts/ece")
#: the axes of the compare view; the last metric colours the lines
COMPARE_PARAMS = ("seed", "loss")
COMPARE_METRICS = ("val/best_dsc", "test/dsc", "test/cece", "test/ece")
WIDTH = 1920
TIMEOUT_S = 120.0


class ScreenshotError(RuntimeError):
    """A screenshot could not be taken (missing browser, no comparison, a page that never showed its content)."""


def is_run_id(value: str) -> bool:
    """MLflow run ids are 32 lower-case hex digits."""
    return re.fullmatch(r"[0-9a-f]{32}", value) is not None


def parent_runs(client, experiment_id: str) -> list:
    """The parent runs of the comparisons in the experiment, newest first."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{PARENT_TAG}` != ''", max_results=5000)
    found = [r for r in found if PARENT_ID_TAG not in r.data.tags]
    return sorted(found, key=lambda r: (r.info.start_time or 0, r.info.run_id), reverse=True)


def find_parent(client, run: str | None = None, experiment: str = EXPERIMENT):
    """The parent run of a comparison.

    Args:
        client: an ``mlflow.MlflowClient``.
        run: a parent run id, a comparison id (``mni/paper``, ``mni/paper/epochs=2``: the ``compare.id`` tag), or
            ``None`` for the newest comparison of the experiment. Several parents of one comparison (shards that
            started together) resolve to the oldest, as ``make compare`` does.
        experiment: the experiment name (default ``compare``).

    Raises:
        ScreenshotError: no such experiment, comparison or parent run; a run id of a child run or of another
            experiment.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ScreenshotError(f"no experiment '{experiment}' in {client.tracking_uri}: run `make compare` first "
                              "(or set MLFLOW_TRACKING_URI to the store that holds it)")
    parents = parent_runs(client, exp.experiment_id)
    if run is None:
        if not parents:
            raise ScreenshotError(f"experiment '{experiment}' of {client.tracking_uri} holds no comparison parent "
                                  "run: run `make compare` first")
        return parents[0]
    if is_run_id(run):
        try:
            found = client.get_run(run)
        except mlflow.exceptions.MlflowException as e:
            raise ScreenshotError(f"run {run} is not in {client.tracking_uri}") from e
        if found.info.experiment_id != exp.experiment_id:
            raise ScreenshotError(f"run {run} is not a comparison run of experiment '{experiment}'")
        if PARENT_ID_TAG in found.data.tags:
            raise ScreenshotError(f"run {run} is a child run; its comparison's parent run is "
                                  f"{found.data.tags[PARENT_ID_TAG]}")
        if PARENT_TAG not in found.data.tags:
            raise ScreenshotError(f"run {run} is not a comparison run of experiment '{experiment}'")
        return found
    matching = [r for r in parents if r.data.tags[PARENT_TAG] == run]
    if not matching:
        known = sorted({r.data.tags[PARENT_TAG] for r in parents})
        raise ScreenshotError(f"no comparison '{run}' in experiment '{experiment}' of {client.tracking_uri}; "
                              f"expected a parent run id or one of {known}")
    return matching[-1]


def comparison_children(client, parent) -> list:
    """The child runs of a comparison, one per grid run (its finished attempt, else its newest), ordered by method,
    hyperparameter value and seed."""
    attempts = child_runs(client, parent.info.experiment_id, parent.info.run_id)

    def order(r) -> tuple:
        t = r.data.tags
        return t.get("compare.method", ""), int(t.get("compare.order") or 0), int(t.get("compare.seed") or 0)

    return sorted((best_attempt(a) for a in attempts.values()), key=lambda r: (*order(r), r.info.run_id))


def method_axes(children: list, method: str) -> tuple[list, list[str]]:
    """The child runs of ``method`` and the parameters their parallel-coordinates plot shows: the seed and the
    method's hyperparameter (``loss.<name>`` from the ``compare.setting`` tag ``<name>=<value>``), next to the
    metrics."""
    runs = [r for r in children if r.data.tags.get("compare.method") == method]
    names = {r.data.tags.get("compare.setting", "").partition("=")[0] for r in runs} - {""}
    hp = [f"loss.{n}" for n in sorted(names) if all(f"loss.{n}" in r.data.params for r in runs)]
    return runs, ["seed", *hp]


def runs_table_url(base: str, experiment_id: str, comparison: str) -> str:
    """The experiment's runs page filtered to one comparison, in the UI's model-training mode (MLflow 3.17 opens an
    experiment on its GenAI overview otherwise, whatever the ``mlflow.experimentKind`` tag says)."""
    query = urllib.parse.urlencode({"workflowType": "machine_learning",
                                    "searchFilter": f"tags.`{PARENT_TAG}` = '{comparison}'"},
                                   quote_via=urllib.parse.quote)
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """The compare-runs page of ``run_ids`` (``#/compare-runs?runs=[…]&experiments=[…]``)."""
    if not run_ids:
        raise ScreenshotError("no runs to compare")
    query = urllib.parse.urlencode({"runs": json.dumps(run_ids), "experiments": json.dumps(sorted(set(experiment_ids))),
                                    "workflowType": "machine_learning"}, quote_via=urllib.parse.quote)
    return f"{base}/#/compare-runs?{query}"


def runs_table_state(parent_id: str, comparison: str) -> dict:
    """The runs page's persisted UI state: the comparison's tags and metrics as columns, the parent expanded."""
    columns = ["attributes.`Run Name`", "runDateAndNestInfo", *(f"metrics.`{m}`" for m in METRIC_COLUMNS),
               "attributes.`Dataset`", "duration", *(f"tags.`{t}`" for t in TAG_COLUMNS)]
    widths = {"attributes.`Run Name`": 275, "attributes.`Dataset`": 190, "duration": 80,
              **{f"metrics.`{m}`": 96 for m in METRIC_COLUMNS}, **{f"tags.`{t}`": 112 for t in TAG_COLUMNS}}
    return {
        "searchFilter": f"tags.`{PARENT_TAG}` = '{comparison}'", "orderByKey": "attributes.start_time",
        "orderByAsc": False, "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
        "modelVersionFilter": "All Runs", "selectedColumns": columns[2:], "columnOrder": columns,
        "columnWidths": widths, "runsExpanded": {parent_id: True}, "runsPinned": [], "runsHidden": [],
        "runsVisibilityMap": {}, "runsHiddenMode": "FIRST_10_RUNS", "viewMaximized": False, "runListHidden": False,
        "isAccordionReordered": False, "useGroupedValuesInCharts": True, "hideEmptyCharts": True, "groupBy": None,
        "groupsExpanded": {}, "autoRefreshEnabled": False,
    }


def local_storage(experiment_id: str, parent_id: str, comparison: str) -> dict[str, str]:
    """The UI's local-storage entries set before a page loads: the runs page state, the model-training mode (the
    choice the UI remembers when a user picks *Model training*), the assistant panel closed."""
    return {
        f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState':
            json.dumps(runs_table_state(parent_id, comparison)),
        "mlflow.workflowType_v1": json.dumps("machine_learning"),
        "mlflow.assistant.panelOpen_v1": "false",
        "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    }


def init_script(entries: dict[str, str]) -> str:
    """JavaScript that writes ``entries`` into the page's local storage."""
    return "".join(f"window.localStorage.setItem({json.dumps(k)}, {json.dumps(v)});" for k, v in entries.items())


def load_playwright():
    """``playwright.sync_api.sync_playwright``, or a :class:`ScreenshotError` saying how to install it."""
    try:
        from playwright.sync_api import sync_playwright  # optional: only `make screenshots` needs it
    except ImportError as e:
        raise ScreenshotError(f"make screenshots needs playwright and Debian's chromium, which the project does not "
                              f"install: {INSTALL}") from e
    return sync_playwright


def find_chromium(path: str | None = None) -> str:
    """The Chromium executable: ``path``, else ``$CHROMIUM``, else ``chromium`` / ``chromium-browser`` on PATH."""
    candidates = [path] if path else [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else \
        ["chromium", "chromium-browser"]
    for c in candidates:
        found = shutil.which(c)
        if found:
            return found
    raise ScreenshotError(f"no Chromium executable ({' or '.join(candidates)}): {INSTALL} "
                          "(or pass --chromium /path/to/chromium)")


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_ui(uri: str, port: int | None = None, timeout: float = TIMEOUT_S) -> Iterator[str]:
    """Serve the MLflow UI of ``uri`` on 127.0.0.1 (as ``make ui``, one worker, no telemetry) until the block ends.

    Yields:
        The base URL, once ``/health`` answers.

    Raises:
        ScreenshotError: the server exited or did not answer within ``timeout`` seconds (its log is quoted).
    """
    port = port or free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-2000:]
                    what = f"exited with code {proc.returncode}" if proc.returncode is not None else \
                        f"did not answer within {timeout:.0f} s"
                    raise ScreenshotError(f"the MLflow UI ({' '.join(cmd)}) {what}:\n{tail}")
                try:
                    with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(1.0)
            yield base
        finally:
            stop(proc)


def stop(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End a server started in its own session, with its worker processes (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def wait_for(locator, what: str, timeout: float = TIMEOUT_S) -> None:
    """Wait until ``locator`` is visible, or raise a :class:`ScreenshotError` naming ``what`` and the page."""
    try:
        locator.first.wait_for(state="visible", timeout=timeout * 1000)
    except Exception as e:  # playwright's TimeoutError (playwright is imported lazily)
        raise ScreenshotError(f"{what} did not appear within {timeout:.0f} s on {locator.page.url} (the MLflow "
                              f"UI's layout may differ from MLflow 3.17's)") from e


def settle(page) -> None:
    """Let the page draw what it has loaded: its fonts, then a moment for the charts' transitions. (The UI keeps a
    connection busy, so waiting for the network to go idle would wait for nothing.)"""
    page.evaluate("() => document.fonts.ready.then(() => true)")
    page.wait_for_timeout(1500)


def choose_axes(page, params: list[str], metrics: list[str]) -> None:
    """Replace the parallel-coordinates plot's axes on the compare-runs page (its two multi-selects)."""
    page.get_by_role("button", name="Clear All").click()
    boxes = page.get_by_role("combobox")
    for i, names in enumerate((params, metrics)):
        box = boxes.nth(i)
        for name in names:
            box.click()
            box.fill(name)
            option = page.locator(f'[class*="select-item-option"][title="{name}"]')
            wait_for(option, f"the option '{name}' of the parallel-coordinates plot", 30)
            option.first.click()
        page.keyboard.press("Escape")
    page.evaluate("() => document.activeElement && document.activeElement.blur()")  # no focus ring in the picture
    plot = page.locator(".js-plotly-plot")
    for name in (*params, *metrics):
        wait_for(plot.get_by_text(name, exact=True), f"the axis '{name}' of the parallel-coordinates plot", 30)


def present(runs: list, params: tuple | list, metrics: tuple | list) -> tuple[list[str], list[str]]:
    """The axes worth drawing for ``runs``: the parameters some of them have with more than one value (one seed
    makes a flat axis), the metrics some of them have (the plot's selects list no others)."""
    return ([p for p in params if len({r.data.params[p] for r in runs if p in r.data.params}) > 1],
            [m for m in metrics if any(m in r.data.metrics for r in runs)])


def take_screenshots(uri: str, parent, children: list, out: Path, chromium: str, method: str = "mbls",
                     width: int = WIDTH, port: int | None = None, say=print) -> list[Path]:
    """Serve the UI of ``uri``, open the comparison's pages in headless Chromium and save the PNGs into ``out``.

    Args:
        uri: the tracking URI of the store.
        parent, children: the comparison's parent run and child runs (:func:`find_parent`,
            :func:`comparison_children`).
        out: the folder of the PNGs (created).
        chromium: the Chromium executable (:func:`find_chromium`).
        method: the method whose runs ``parallel_coordinates.png`` shows (skipped when it has no run).
        width: the browser's width in CSS pixels (default 1920).
        port: the UI's port (default: a free one).

    Returns:
        The paths written: ``runs_table.png``, ``compare_view.png`` and, when ``method`` has runs,
        ``parallel_coordinates.png``.
    """
    sync_playwright = load_playwright()
    out.mkdir(parents=True, exist_ok=True)
    experiment_id, comparison = parent.info.experiment_id, parent.data.tags[PARENT_TAG]
    storage = local_storage(experiment_id, parent.info.run_id, comparison)
    written = []
    with mlflow_ui(uri, port) as base, sync_playwright() as pw:
        say(f"MLflow UI of {uri} on {base}")
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=list(BROWSER_FLAGS[1:]))
        try:
            height = min(max(330 + 34 * (len(children) + 1), 700), 1600)
            context = browser.new_context(viewport={"width": width, "height": height})
            context.add_init_script(init_script(storage))
            page = context.new_page()
            page.goto(runs_table_url(base, experiment_id, comparison))
            for r in (parent, children[0], children[-1]):
                wait_for(page.locator(f'a[href$="/runs/{r.info.run_id}"]'), f"the row of run {r.info.run_name}")
            wait_for(page.locator(f'[col-id="metrics.`{METRIC_COLUMNS[0]}`"]'), f"the column {METRIC_COLUMNS[0]}")
            settle(page)
            written.append(out / "runs_table.png")
            page.screenshot(path=str(written[-1]))
            say(f"{written[-1]}: the runs table of '{comparison}' ({len(children)} child runs)")

            page.set_viewport_size({"width": width, "height": 1100})
            page.goto(compare_url(base, [r.info.run_id for r in children], [experiment_id]))
            wait_for(page.get_by_text(f"Comparing {len(children)} Runs"), "the compare-runs page")
            choose_axes(page, *present(children, COMPARE_PARAMS, COMPARE_METRICS))
            settle(page)
            written.append(out / "compare_view.png")
            page.screenshot(path=str(written[-1]))
            say(f"{written[-1]}: the compare view of the {len(children)} child runs")

            runs, params = method_axes(children, method)
            if not runs:
                say(f"no child run of method '{method}': no parallel_coordinates.png")
                return written
            page.goto(compare_url(base, [r.info.run_id for r in runs], [experiment_id]))
            wait_for(page.get_by_text(f"Comparing {len(runs)} Runs"), "the compare-runs page")
            choose_axes(page, *present(runs, params, COMPARE_METRICS))
            settle(page)
            written.append(out / "parallel_coordinates.png")
            page.locator(".js-plotly-plot").first.screenshot(path=str(written[-1]))
            say(f"{written[-1]}: the parallel-coordinates plot of the {len(runs)} '{method}' runs")
        finally:
            browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.compare.screenshots", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None,
                    help="parent run id or comparison id (mni/paper; default: the newest comparison)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "img", help="folder of the PNGs (docs/img)")
    ap.add_argument("--method", default="mbls", help="method of parallel_coordinates.png (default mbls)")
    ap.add_argument("--chromium", default=None, help="Chromium executable (default: $CHROMIUM, else chromium)")
    ap.add_argument("--width", type=int, default=WIDTH, help=f"browser width in pixels (default {WIDTH})")
    ap.add_argument("--port", type=int, default=None, help="port of the MLflow UI (default: a free one)")
    args = ap.parse_args(argv)
    try:
        load_playwright()
        chromium = find_chromium(args.chromium)
        uri = tracking_uri()
        client = mlflow.MlflowClient(tracking_uri=uri)
        parent = find_parent(client, args.run)
        children = comparison_children(client, parent)
        if not children:
            raise ScreenshotError(f"comparison '{parent.data.tags[PARENT_TAG]}' (parent run {parent.info.run_id}) "
                                  "has no child run yet")
        take_screenshots(uri, parent, children, args.out, chromium, args.method, args.width, args.port)
    except ScreenshotError as e:
        print(f"screenshots: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
