"""Dashboard cost: the core stage's throughput with and without the live dashboard open.

"dashboard-open" keeps headless Chromium (Debian's chromium) on the dashboard for the whole
run, polling ``/api/status`` and what is new in ``/api/history`` and ``/api/dead-letters`` every
two seconds like a person watching it; the daemon samples its history once a second meanwhile.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from benchmarks.core import WORKLOAD, compare, run_streamflow
from benchmarks.processes import Measures
from streamflow.runtime.pipeline import PipelineRunner

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--remote-debugging-port=0"]


@contextmanager
def browsers() -> Iterator[list[subprocess.Popen[bytes]]]:
    opened: list[subprocess.Popen[bytes]] = []
    try:
        yield opened
    finally:
        for browser in opened:
            browser.terminate()
            browser.wait(10)


def run_dashboard(records: int, repeat: int) -> list[dict[str, Any]]:
    binary = shutil.which("chromium")
    if binary is None:
        raise SystemExit("the dashboard benchmark needs chromium (apt-get install chromium)")
    with browsers() as opened, tempfile.TemporaryDirectory() as profile:
        def open_dashboard(runner: PipelineRunner) -> None:
            assert runner.metrics_server is not None  # it starts before the stages
            url = f"http://127.0.0.1:{runner.metrics_server.port}/"
            opened.append(subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                            url], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL))

        def with_dashboard(bootstrap: str, source: str, count: int) -> Measures:
            return run_streamflow(bootstrap, source, count, open_dashboard)

        return compare({"streamflow": run_streamflow, "streamflow-dashboard-open": with_dashboard},
                       WORKLOAD, records, repeat)
