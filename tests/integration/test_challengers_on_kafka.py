"""Champion and challenger on a real broker: river's Bananas dataset (shipped in the river
package) through the file source, Kafka and a model stage whose challenger is clearly better."""

from __future__ import annotations

import bisect
import itertools
import json
import signal
import threading
from pathlib import Path

import pytest
from river import datasets, feature_extraction, linear_model, metrics, preprocessing, tree

from streamflow.config import load_pipeline
from streamflow.ml.checkpoint import CheckpointStore
from streamflow.ml.registry import Registry
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport.broker import free_port
from tests.browser import Browser, chromium_binary
from tests.helpers import finish_logged, read_topic, start_logged
from tests.integration.test_model_stage import (
    pipeline_file,
    stage_command,
    wait_for_checkpoint,
    write_dataset,
)
from tests.integration.test_operations import DashboardPage, base_url, wait_until
from tests.unit.test_challengers import POLY_SPEC as POLY
from tests.unit.test_challengers import own_predictions

LOGISTIC = [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}]
def position(bootstrap: str, offset: int) -> int:
    """The position in the stream of the record at ``offset`` of features' partition 0 (the
    source writes in transactions, whose markers take offsets too)."""
    return bisect.bisect_left(read_topic(bootstrap, "features").offsets, offset)


def test_the_promoted_challenger_predicts_from_the_offset_on_the_models_topic(
    fresh_broker: str, tmp_path: Path,
) -> None:
    stream = list(datasets.Bananas())
    write_dataset(tmp_path / "data.jsonl", stream)
    path = pipeline_file(
        tmp_path, fresh_broker, LOGISTIC, ["Accuracy"],
        challengers=[{"name": "poly", "estimator": POLY}],
        promotion={"metric": "Accuracy", "by": 0.05, "over": 500, "evaluations": 3},
        batch={"max_records": 200, "max_wait_ms": 10})
    runner = PipelineRunner(load_pipeline(path), until_idle_s=1.5)
    assert runner.run().exit_code == 0

    (promotion,) = [json.loads(value) for value in read_topic(fresh_broker, "learn.models").values]
    assert {key: promotion[key] for key in ("event", "pipeline", "stage", "topic", "partition",
                                            "promoted", "demoted")} == {
        "event": "promotion", "pipeline": "learn", "stage": "model", "topic": "features",
        "partition": 0, "promoted": "poly", "demoted": "main"}
    offset = position(fresh_broker, promotion["offset"])
    assert 1500 <= offset < len(stream)
    scored = read_topic(fresh_broker, "scored")
    assert scored.offsets == list(range(len(stream)))
    records = [json.loads(value) for value in scored.values]
    published = [record["prediction"] for record in records]
    by_logistic = own_predictions(preprocessing.StandardScaler() | linear_model.LogisticRegression(),
                                  stream)
    by_poly = own_predictions(preprocessing.StandardScaler()
                              | feature_extraction.PolynomialExtender(degree=3)
                              | linear_model.LogisticRegression(), stream)
    assert published[:offset] == by_logistic[:offset]
    assert published[offset:] == by_poly[offset:]
    assert by_logistic[offset:] != by_poly[offset:]  # the switch shows
    assert [record["model_version"] for record in records] == list(range(len(stream)))

    labels = {"pipeline": "learn", "stage": "model", "model": "StandardScaler|LogisticRegression"}
    registry = runner.metrics.registry
    assert registry.get_sample_value("streamflow_model_promotions_total", labels) == 1
    assert registry.get_sample_value("streamflow_model_champion",
                                     {**labels, "candidate": "poly", "partition": "0"}) == 1
    accuracy = metrics.Accuracy()
    for (_x, y), prediction in zip(stream, by_poly, strict=True):
        accuracy.update(y, prediction)
    assert registry.get_sample_value("streamflow_model_candidate_metric", {
        **labels, "candidate": "poly", "metric": "Accuracy", "window": "cumulative",
        "partition": "0"}) == pytest.approx(accuracy.get(), abs=1e-12)

    # The last version (the stop's checkpoint) holds both models and their standings.
    last = Registry.of_stage(tmp_path / "checkpoints", "learn", "model").versions()[-1]
    models = last.metadata["partitions"]["features+0"]["models"]
    assert {name: (model["champion"], model["records_learned"]) for name, model in models.items()} \
        == {"poly": (True, len(stream)), "main": (False, len(stream))}
    assert models["poly"]["metrics"]["Accuracy"]["cumulative"] == pytest.approx(accuracy.get(),
                                                                                abs=1e-12)


@pytest.mark.skipif(chromium_binary() is None, reason="needs chromium (apt-get install chromium)")
def test_the_dashboard_draws_a_line_per_model_and_names_the_champion(
    fresh_broker: str, tmp_path: Path,
) -> None:
    write_dataset(tmp_path / "data.jsonl", list(datasets.Bananas()))
    path = pipeline_file(
        tmp_path, fresh_broker, LOGISTIC, ["Accuracy"],
        challengers=[{"name": "poly", "estimator": POLY}],
        promotion={"metric": "Accuracy", "by": 0.05, "over": 500, "evaluations": 3},
        batch={"max_records": 200, "max_wait_ms": 10})
    config = load_pipeline(path)
    config.metrics.port = free_port()
    runner = PipelineRunner(config)
    thread = threading.Thread(target=runner.run)
    thread.start()
    try:
        url = base_url(runner)
        labels = {"pipeline": "learn", "stage": "model",
                  "model": "StandardScaler|LogisticRegression"}
        wait_until(lambda: runner.metrics.registry.get_sample_value(
            "streamflow_model_promotions_total", labels) == 1, what="the promotion")
        with Browser(f"{url}/") as browser:
            page = DashboardPage(browser)
            wait_until(lambda: "model/poly Accuracy (rolling)" in page.charts().get(
                "chart-model", {}).get("last", {}), 30, "the challenger's line")
            legend = browser.evaluate("""[...document.querySelectorAll(
                '#chart-model .u-legend .u-series .u-label')].map(l => l.textContent)""")
    finally:
        runner.stop()
        thread.join(60)
    assert {"model Accuracy", "model Accuracy (rolling)", "model/main Accuracy",
            "model/main Accuracy (rolling)", "model/poly Accuracy (champion)",
            "model/poly Accuracy (rolling) (champion)"} <= set(legend), legend


def test_challengers_resume_from_the_checkpoint_after_a_sigkill(
    fresh_broker: str, tmp_path: Path,
) -> None:
    """Killed long before the promotion, the stage restarts from its checkpoint with its
    challenger: each model ends having learned every record once, measured as it would be
    alone, and the one promotion splits the output between the two models' own predictions."""
    stream = list(itertools.islice(datasets.synth.Friedman(seed=7), 20_000))
    write_dataset(tmp_path / "data.jsonl", stream)
    path = pipeline_file(
        tmp_path, fresh_broker, [{"linear_model.LinearRegression": {}}], ["MAE"],
        challengers=[{"name": "tree", "estimator": [{"tree.HoeffdingTreeRegressor": {}}]}],
        # the tree's MAE over 5,000 records is 0.13 below at 5,000, then 0.38 and 0.43 below
        promotion={"metric": "MAE", "by": 0.2, "over": 5000, "evaluations": 2},
        batch={"max_records": 100, "max_wait_ms": 10})
    log = tmp_path / "runs.log"
    finish_logged(start_logged(stage_command(path, "data", "0.5"), log), log, timeout_s=120)
    store = CheckpointStore(tmp_path / "checkpoints", "learn", "model")
    stage = start_logged(stage_command(path, "model"), log)
    covered = wait_for_checkpoint(store, 2_000)
    stage.send_signal(signal.SIGKILL)
    stage.wait(timeout=30)
    assert 2_000 <= covered < 8_000, f"killed at {covered}: not well before the promotion"
    finish_logged(start_logged(stage_command(path, "model", "1"), log), log, timeout_s=300)

    by_linear = own_predictions(linear_model.LinearRegression(), stream)
    by_tree = own_predictions(tree.HoeffdingTreeRegressor(), stream)
    header, _payload = store.load("features+0", "partition-state")
    standings = header["models"]
    assert {name: (model["champion"], model["records_learned"])
            for name, model in standings.items()} == {
        "tree": (True, len(stream)), "main": (False, len(stream))}
    for name, predictions in (("main", by_linear), ("tree", by_tree)):
        error = metrics.MAE()
        for (_x, y), prediction in zip(stream, predictions, strict=True):
            error.update(y, prediction)
        assert standings[name]["metrics"]["MAE"]["cumulative"] == pytest.approx(error.get(),
                                                                                 abs=1e-9)
    (promotion,) = [json.loads(value) for value in read_topic(fresh_broker, "learn.models").values]
    assert promotion["promoted"] == "tree" and 15_000 <= promotion["offset"] < len(stream)
    # Records after the checkpoint were produced again (at_least_once), by the same models.
    split = position(fresh_broker, promotion["offset"])
    for value in read_topic(fresh_broker, "scored").values:
        record = json.loads(value)
        version = record["model_version"]  # every record is labelled: its position
        expected = by_linear[version] if version < split else by_tree[version]
        assert record["prediction"] == pytest.approx(expected, abs=1e-9), version
