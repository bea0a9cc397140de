"""The ``model_report`` scheduled job: registry versions written by a model worker's own code
(a rollback among them), reported as a Parquet table and a PNG chart; its validation; a run on
the scheduler's fake clock."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from streamflow.cli import main
from streamflow.config.loader import parse_pipeline
from streamflow.config.models import PipelineConfig
from streamflow.metrics import PipelineMetrics
from streamflow.ml.registry import Registry
from streamflow.runtime.jobs import build_job
from streamflow.runtime.model_report import ModelReport, report_chart, write_model_report
from streamflow.runtime.schedules import Schedule, Scheduler
from tests.model_versions import TOPIC, VersionWriter
from tests.unit.test_schedules import START, FakeClock

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_versions(root: Path) -> Registry:
    """Versions 1-3 learned 10, 30 and 60 records; version 4 continues from a rollback to
    version 1 and learned 5 more (15)."""
    writer = VersionWriter(root)
    for count in (10, 20, 30):
        writer.learn(count)
        writer.checkpoint()
    writer.roll_back(1)
    writer.learn(5)
    writer.checkpoint()
    return writer.registry


def config(tmp_path: Path, **report: object) -> PipelineConfig:
    return parse_pipeline({
        "pipeline": "p",
        "models": [{"name": "model", "input": TOPIC, "output": "scored", "target": "y",
                    "estimator": [{"linear_model.LinearRegression": {}}], "metrics": ["MAE"],
                    "checkpoint": {"path": str(tmp_path / "checkpoints")}}],
        "schedules": [{"name": "report", "cron": "0 3 * * *",
                       "model_report": {"output_dir": str(tmp_path / "reports"), **report}}],
    })


def test_the_report_holds_each_versions_metrics_and_charts_them(tmp_path: Path) -> None:
    registry = make_versions(tmp_path / "checkpoints")
    report = build_job(config(tmp_path).schedules[0], config(tmp_path))()
    assert isinstance(report, ModelReport) and report.versions == 4
    assert report.table.parent == tmp_path / "reports"
    assert report.table.name.startswith("model-report-model-")

    table = pq.read_table(report.table)
    rows = table.to_pylist()
    versions = registry.versions()
    assert [row["version"] for row in rows] == [1, 2, 3, 4]
    assert [row["records_learned"] for row in rows] == [10, 30, 60, 15]
    assert [row["rollback_to"] for row in rows] == [None, None, None, 1]
    assert [row["next_offsets"] for row in rows] == [[(TOPIC, n)] for n in (10, 30, 60, 65)]
    for row, version in zip(rows, versions, strict=True):
        part = version.metadata["partitions"][f"{TOPIC}+0"]
        assert (row["metric"], row["cumulative"], row["rolling"]) == (
            "MAE", part["metrics"]["MAE"]["cumulative"], part["metrics"]["MAE"]["rolling"])
        assert row["created_at"] == datetime.fromtimestamp(
            version.metadata["created_at"], UTC).replace(microsecond=row["created_at"].microsecond)
        assert (row["stage"], row["partition"], row["config_hash"]) == ("model", 0, "c0ffee")
    assert len({row["cumulative"] for row in rows}) == 4  # the metric moved between versions

    assert report.chart.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(report.chart) as image:
        image.load()
        assert image.format == "PNG" and image.size == (900, 2 * 260 + 60)
        assert image.text["Source"] == report.table.name
        assert "p.model: 4 versions" in image.text["Title"]
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 10
    # the chart drawn from the table read back: a panel per metric, then records learned
    mae, learned = report_chart(table, "read back").axes
    assert mae.get_ylabel() == "MAE" and learned.get_ylabel() == "records learned"
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
             for line in mae.lines}
    assert lines.pop("_child2") == ([4, 4], [0, 1])  # the rollback's vertical line
    assert lines == {f"partition 0 {window}": ([1, 2, 3, 4], [row[window] for row in rows])
                     for window in ("cumulative", "rolling")}
    [line, rollback] = learned.lines
    assert (list(line.get_xdata()), list(line.get_ydata())) == ([1, 2, 3, 4], [10, 30, 60, 15])
    assert list(rollback.get_xdata()) == [4, 4]
    assert [text.get_text() for text in mae.texts] == ["rollback to 1"]


def test_the_report_covers_the_versions_of_its_period(tmp_path: Path) -> None:
    registry = make_versions(tmp_path / "checkpoints")
    first, second = (registry.version(n).metadata["created_at"] for n in (1, 2))
    between = datetime.fromtimestamp((first + second) / 2, UTC)  # after 1 was created, before 2
    report = write_model_report(registry, "p", "model", timedelta(days=7), tmp_path,
                                now=between + timedelta(days=7))
    assert pq.read_table(report.table).column("version").to_pylist() == [2, 3, 4]
    empty = write_model_report(registry, "p", "model", timedelta(hours=1), tmp_path,
                               now=between + timedelta(days=8))
    assert empty.versions == 0 and pq.read_table(empty.table).num_rows == 0
    assert empty.chart.read_bytes().startswith(PNG_SIGNATURE)
    assert sorted(path.suffix for path in tmp_path.iterdir() if path.is_file()) == [
        ".parquet", ".parquet", ".png", ".png"]  # no temporary file left


def test_the_scheduler_runs_the_report_on_its_ticks(tmp_path: Path) -> None:
    make_versions(tmp_path / "checkpoints")
    pipeline = config(tmp_path, stage="model", since="2w")
    clock, metrics = FakeClock(START), PipelineMetrics("p")
    schedule = Schedule("report", "0 3 * * *", build_job(pipeline.schedules[0], pipeline))
    scheduler = Scheduler([schedule], metrics, clock=clock)
    scheduler.start_up()
    clock.advance(3 * 3600)
    scheduler.run_due()
    assert scheduler.join_jobs(30) == []
    assert (schedule.runs, schedule.failures, schedule.last_error) == (1, 0, None)
    assert len(list((tmp_path / "reports").glob("*.png"))) == 1


def validate(tmp_path: Path, data: PipelineConfig | dict[str, object],
             capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["validate", str(path)])
    return code, capsys.readouterr().err


def pipeline_data(tmp_path: Path, models: int, **report: object) -> dict[str, object]:
    return {
        "pipeline": "p",
        "topics": [{"name": "in", "external": True}],
        "models": [{"name": f"m{n}", "input": "in", "output": f"out{n}", "target": "y",
                    "estimator": [{"linear_model.LinearRegression": {}}]} for n in range(models)],
        "schedules": [{"name": "report", "cron": "0 3 * * *",
                       "model_report": {"output_dir": str(tmp_path), **report}}],
    }


@pytest.mark.parametrize(("models", "report", "expected"), [
    (1, {"stage": "other"}, "schedules[0].model_report.stage: 'other' is no model stage of this "
     "pipeline; name one of ['m0']"),
    (2, {}, "schedules[0].model_report.stage: name one of the model stages: ['m0', 'm1']"),
    (0, {}, "schedules[0].model_report.stage: this pipeline has no model stage to report on"),
    (1, {"since": "a week"}, "schedules[0].model_report.since"),
])
def test_a_bad_report_is_reported_at_validate_with_its_field_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], models: int, report: dict[str, object],
    expected: str,
) -> None:
    code, err = validate(tmp_path, pipeline_data(tmp_path, models, **report), capsys)
    assert code == 2
    assert expected in err


def test_a_report_without_matplotlib_is_refused_at_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert validate(tmp_path, pipeline_data(tmp_path, 1), capsys)[0] == 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an import finds without it
    code, err = validate(tmp_path, pipeline_data(tmp_path, 1), capsys)
    assert code == 2
    assert "schedules[0].model_report: needs matplotlib" in err
    assert "pip install 'streamflow[reports]'" in err
