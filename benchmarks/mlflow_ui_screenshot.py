"""Look at a sweep the way a researcher first sees it: start a real `mlflow server` on 127.0.0.1 over a
tracking store, open the link the end-of-sweep message prints (saved view, "Model training" runs,
charts), and take a headless Chromium screenshot of it, plus one of the parent run's page.

    python benchmarks/mlflow_ui_screenshot.py --tracking-uri sqlite:///<abs path>/mlflow.db --out shots/
    python benchmarks/mlflow_ui_screenshot.py --tracking-uri .   # the folder `make demo` ran in (its mlflow.db)

`--parent-run-id` picks a sweep; without it, the newest sweep parent run of the store.

Needs a `chromium` binary (Debian: `apt-get install chromium`). Nothing leaves the machine: the
server listens on 127.0.0.1 and Chromium runs with background networking, sync and updates off,
in a fresh temporary profile.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from infra.tracking import Tracker, run_url
from sweeps.sweep_ui import sweep_links

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"mlflow server at {url} not healthy after {timeout_s:.0f} s")


def screenshot(chromium: str, url: str, path: Path, size: str, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                        f"--virtual-time-budget={wait_ms}", f"--screenshot={path}", url],
                       check=True, capture_output=True, timeout=600)  # a loaded 2-core machine needs minutes


def store_uri(given: str) -> str:
    """A tracking URI as given (sqlite:///..., http://...); a path is a SQLite file, or a folder holding the
    mlflow.db a sweep run there left (its default store). A path that is not there is a user error."""
    if "://" in given or given.startswith("sqlite:"):
        return given
    path = Path(given).expanduser()
    if path.is_dir():
        path = path / "mlflow.db"
    if not path.is_file():
        raise SystemExit(f"--tracking-uri {given}: no MLflow SQLite store there ({path} is missing); pass the "
                         "folder a sweep ran in, its mlflow.db, or a tracking URI")
    return f"sqlite:///{path.resolve()}"


def sweep_runs(tracker: Tracker, parent_run_id: str):
    """(experiment id, parent run id, trial run ids) of a given sweep parent run."""
    parent = tracker.client.get_run(parent_run_id)
    trials = tracker.child_runs(parent.info.experiment_id, parent_run_id)
    return parent.info.experiment_id, parent_run_id, [t.info.run_id for t in trials]


def latest_sweep(tracker: Tracker, experiment_name: str | None):
    """(experiment id, parent run id, trial run ids) of the newest sweep parent run."""
    experiments = ([tracker.client.get_experiment_by_name(experiment_name)] if experiment_name
                   else tracker.client.search_experiments())
    parents = tracker.client.search_runs([e.experiment_id for e in experiments if e is not None],
                                         filter_string="attributes.run_name LIKE 'sweep:%'",
                                         order_by=["attributes.start_time DESC"], max_results=1)
    if not parents:
        raise SystemExit("--tracking-uri: no sweep parent run (run name 'sweep:...') in this store")
    parent = parents[0]
    trials = tracker.child_runs(parent.info.experiment_id, parent.info.run_id)
    return parent.info.experiment_id, parent.info.run_id, [t.info.run_id for t in trials]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True,
                        help="the sweep's store: a URI (sqlite:///<abs path>/mlflow.db), a SQLite file, or the folder the sweep ran in")
    parser.add_argument("--experiment-name", default=None)
    parser.add_argument("--parent-run-id", default=None, help="the sweep's parent run (default: the newest sweep of the store)")
    parser.add_argument("--out", default="mlflow_screenshots")
    parser.add_argument("--size", default="1600,1000", help="window WIDTH,HEIGHT")
    parser.add_argument("--wait-ms", type=int, default=45000, help="virtual time for the page to load its runs and charts")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("chromium not found: install it (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    uri = store_uri(args.tracking_uri)
    tracker = Tracker(uri)
    experiment_id, parent_run_id, trial_ids = (sweep_runs(tracker, args.parent_run_id) if args.parent_run_id
                                               else latest_sweep(tracker, args.experiment_name))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(base, 120)
        links = sweep_links(base, experiment_id, parent_run_id, trial_ids)
        shots = {"runs_view.png": links["runs"], "parent_run.png": run_url(base, experiment_id, parent_run_id),
                 "plain_experiment.png": f"{base}/#/experiments/{experiment_id}"}
        for name, url in shots.items():
            screenshot(chromium, url, out / name, args.size, args.wait_ms)
            print(f"{out / name}: {url}")
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
