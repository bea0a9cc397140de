"""`streamflow status --json`: a running daemon's readiness and per-stage figures as JSON."""

from __future__ import annotations

import json

import pytest

from streamflow.cli import main
from streamflow.metrics import PipelineMetrics
from streamflow.metrics.server import MetricsServer


def test_status_json_gives_readiness_detail_and_stage_figures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    metrics = PipelineMetrics("p")
    metrics.stage("clean").count(10, 7, 3)
    detail = {"reason": "components not ready", "components": {"lake": "not running"}}
    server = MetricsServer(metrics.registry, "127.0.0.1", 0,
                           readiness=lambda: (False, detail)).start()
    try:
        assert main(["status", "--url", server.url, "--json"]) == 3
    finally:
        server.stop()
    report = json.loads(capsys.readouterr().out)
    assert report["ready"] is False and report["detail"] == detail
    clean = report["stages"]["clean"]
    assert (clean["in"], clean["out"], clean["dead_lettered"], clean["lag"]) == (10, 7, 3, 0)
