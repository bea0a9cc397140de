"""The quickstart pipeline end to end on a real broker: every generated record is accounted for."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import duckdb
import pytest

from connectors.sources.generator import GeneratorConfig, sensor_event
from streamflow.config import load_pipeline
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport.broker import EmbeddedBroker
from tests.helpers import read_topic

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart.yaml"
COUNT = 6000


def quickstart_env(bootstrap: str, output: Path, **extra: str) -> dict[str, str]:
    return {
        "STREAMFLOW_BOOTSTRAP": bootstrap,
        "QUICKSTART_OUTPUT": str(output),
        "QUICKSTART_CHECKPOINTS": str(output.parent / "checkpoints"),
        "QUICKSTART_COUNT": str(COUNT),
        "QUICKSTART_RATE": "0",
        **extra,
    }


def parquet_rows(output: Path) -> int:
    pattern = str(output / "**" / "*.parquet")
    return int(duckdb.sql(f"SELECT count(*) FROM read_parquet('{pattern}')").fetchall()[0][0])


def test_quickstart_accounts_for_every_generated_record(fresh_broker: str, tmp_path: Path) -> None:
    output = tmp_path / "lake"
    config = load_pipeline(QUICKSTART, quickstart_env(fresh_broker, output))
    runner = PipelineRunner(config, until_idle_s=2, metrics_port=0)

    result = runner.run()

    assert result.exit_code == 0, result.errors
    dead = read_topic(fresh_broker, "quickstart.dlq")
    written = parquet_rows(output)
    assert written + len(dead) == COUNT
    generator = GeneratorConfig(count=COUNT, seed=7, malformed_fraction=0.02)
    malformed = sum(
        not _is_valid(sensor_event(generator, index)[1]) for index in range(COUNT)
    )
    assert len(dead) == malformed > 0

    # Dead letters keep the original value and say where they came from and why.
    headers = dict(dead.headers[0] or [])
    assert headers["streamflow.stage"] == b"clean"
    assert headers["streamflow.original.topic"] == b"sensors.raw"
    assert int(headers["streamflow.original.offset"]) >= 0
    assert headers["streamflow.error.class"] in {b"DecodeError", b"SchemaViolation"}

    # The Parquet output is readable by pyarrow and DuckDB alike and carries the prediction.
    columns = duckdb.sql(
        f"SELECT * FROM read_parquet('{output}/**/*.parquet') LIMIT 1"
    ).columns
    assert {"prediction", "temperature_f", "device_id"} <= set(columns)
    mae = duckdb.sql(
        f"SELECT avg(abs(prediction - temperature)) FROM read_parquet('{output}/**/*.parquet')"
    ).fetchall()[0][0]
    assert mae < 1.5  # noise sd is 0.5: the model learned the relationship

    # Counters reconcile per stage: in = out + filtered + dead-lettered.
    samples = _samples(runner)
    for stage in ("clean", "predict", "lake"):
        got = {name: samples[(name, stage)] for name in ("in", "out", "filtered", "dead_lettered")}
        assert got["in"] == got["out"] + got["filtered"] + got["dead_lettered"], (stage, got)
    assert samples[("in", "clean")] == COUNT
    assert samples[("dead_lettered", "clean")] == malformed


def _is_valid(value: bytes) -> bool:
    try:
        event = json.loads(value)
    except ValueError:
        return False
    return (
        isinstance(event, dict)
        and isinstance(event.get("device_id"), str)
        and isinstance(event.get("temperature"), float | int)
    )


def _samples(runner: PipelineRunner) -> dict[tuple[str, str], float]:
    found = {}
    for family in runner.metrics.registry.collect():
        for sample in family.samples:
            if sample.name.startswith("streamflow_records_") and sample.name.endswith("_total"):
                kind = sample.name.removeprefix("streamflow_records_").removesuffix("_total")
                found[(kind, sample.labels["stage"])] = sample.value
    return found


def test_metrics_endpoint_serves_stage_counters(fresh_broker: str, tmp_path: Path) -> None:
    config = load_pipeline(QUICKSTART, quickstart_env(fresh_broker, tmp_path / "lake"))
    runner = PipelineRunner(config, until_idle_s=1, metrics_port=0)
    import threading

    scraped: list[str] = []

    def scrape_when_flowing() -> None:
        while runner.metrics_server is None:
            threading.Event().wait(0.05)
        url = f"http://127.0.0.1:{runner.metrics_server.port}/metrics"
        for _attempt in range(200):
            body = urllib.request.urlopen(url, timeout=5).read().decode()
            if 'streamflow_records_out_total{pipeline="quickstart",stage="lake"}' in body:
                scraped.append(body)
                return
            threading.Event().wait(0.1)

    scraper = threading.Thread(target=scrape_when_flowing)
    scraper.start()
    assert runner.run().exit_code == 0
    scraper.join()
    assert scraped, "the metrics endpoint never showed the sink's counter"
    body = scraped[0]
    assert "streamflow_batch_processing_seconds_bucket" in body
    assert 'streamflow_records_dead_lettered_total{pipeline="quickstart",stage="clean"}' in body


@pytest.mark.parametrize("client", ["kafka-python"])
def test_quickstart_on_the_second_transport(fresh_broker: str, tmp_path: Path, client: str) -> None:
    output = tmp_path / "lake"
    config = load_pipeline(QUICKSTART, quickstart_env(fresh_broker, output, QUICKSTART_COUNT="1500"))
    config.kafka.client = client  # type: ignore[assignment]
    result = PipelineRunner(config, until_idle_s=2, metrics_port=0).run()
    assert result.exit_code == 0, result.errors
    dead = read_topic(fresh_broker, "quickstart.dlq")
    assert parquet_rows(output) + len(dead) == 1500


def test_a_rerun_on_a_new_broker_starts_models_afresh(tmp_path: Path) -> None:
    """Checkpoints outlive the in-memory embedded broker; a rerun must not skip its records."""
    for run in range(2):
        with EmbeddedBroker() as broker:
            output = tmp_path / f"lake{run}"
            env = quickstart_env(broker.bootstrap, output, QUICKSTART_COUNT="1000",
                                 QUICKSTART_CHECKPOINTS=str(tmp_path / "checkpoints"))
            result = PipelineRunner(load_pipeline(QUICKSTART, env), until_idle_s=3,
                                    metrics_port=0).run()
            assert result.exit_code == 0, result.errors
            dead = read_topic(broker.bootstrap, "quickstart.dlq")
            assert parquet_rows(output) + len(dead) == 1000
