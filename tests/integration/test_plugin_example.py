"""A third-party plugin package (examples/plugin-example), installed the ordinary way, is listed by
`streamflow connectors` and runs in a pipeline like a built-in source."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import read_topic
from tests.source_runs import unique

EXAMPLE = Path(__file__).parents[2] / "examples" / "plugin-example"


def test_installed_plugin_is_listed_and_runs(tmp_path: Path, fresh_broker: str) -> None:
    # A non-editable install into a directory of its own, put on the path of the child processes
    # only: offline (no build isolation) and nothing to uninstall afterwards.
    source_tree, target = tmp_path / "src", tmp_path / "site"
    shutil.copytree(EXAMPLE, source_tree)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source_tree)],
        check=True, capture_output=True, timeout=120,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}

    def streamflow(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "streamflow", *args], env=env, text=True,
                              capture_output=True, timeout=120)

    listed = json.loads(streamflow("connectors", "list", "--json").stdout)
    ticker = next(c for c in listed if c["name"] == "ticker")
    assert ticker["kind"] == "source" and ticker["package"] == "streamflow-plugin-example"
    assert ticker["error"] is None and "symbols" in ticker["config_schema"]["properties"]
    assert "streamflow-plugin-example" in streamflow("connectors", "show", "ticker").stdout

    topic = unique("quotes")
    pipeline = tmp_path / "ticker.yaml"
    pipeline.write_text(json.dumps({
        "pipeline": unique("p"), "kafka": {"bootstrap": fresh_broker},
        "topics": [{"name": topic, "partitions": 1}],
        "sources": [{"name": "quotes", "type": "ticker", "topic": topic, "count": 30, "rate": 0,
                     "symbols": ["ACME", "GLOBEX"]}],
    }))
    run = streamflow("run", str(pipeline), "--until-idle", "0.5", "--metrics-port", "0")
    assert run.returncode == 0, run.stderr[-2000:]
    records = read_topic(fresh_broker, topic)
    quotes = [json.loads(value) for value in records.values]
    assert [q["seq"] for q in quotes] == list(range(30))
    assert records.keys[:2] == [b"ACME", b"GLOBEX"]
