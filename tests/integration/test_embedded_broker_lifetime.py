"""The embedded broker never outlives its daemon, even one killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.source_runs import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")


def tansu_children(pid: int) -> list[int]:
    """The Tansu processes among the children of ``pid``."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(child) for child in (task / "children").read_text().split()]
    return [child for child in found if Path(f"/proc/{child}/comm").read_text().strip() == "tansu"]


def alive(pid: int) -> bool:
    """Running, not merely a zombie awaiting its reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_tansu_ends_with_a_daemon_killed_by_sigkill(tmp_path: Path) -> None:
    pipeline = {
        "pipeline": "orphan",
        "kafka": {"bootstrap": "embedded"},
        "sources": [{"name": "gen", "type": "generator", "topic": "events", "rate": 10}],
        "metrics": {"enabled": False},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps(pipeline))
    with open(tmp_path / "run.log", "ab") as log:
        daemon = subprocess.Popen([sys.executable, "-m", "streamflow", "run", str(path)],
                                  stdout=log, stderr=subprocess.STDOUT)
    tansu: list[int] = []
    try:
        wait_until(lambda: bool(tansu_children(daemon.pid)), 60, "Tansu to start")
        tansu = tansu_children(daemon.pid)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        deadline = time.monotonic() + 5
        while any(map(alive, tansu)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(alive, tansu)), f"Tansu ({tansu}) outlived its daemon"
    finally:
        daemon.kill()
        daemon.wait(10)
        for pid in filter(alive, tansu):
            os.kill(pid, signal.SIGKILL)
