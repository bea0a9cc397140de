"""Champion and challenger without a broker: challengers learn beside a model stage's champion
and a promotion rule swaps them. River's Bananas dataset (5,300 records shipped in the river
package, nothing downloaded) has a challenger that is clearly better than a logistic regression
(the same on polynomial features: about 0.72 against 0.54 accuracy) and ones that are not;
TrumpApproval (also shipped) checks a metric where smaller is better. The models are
deterministic: river's default KNNClassifier, an approximate search seeded at random, is not."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import yaml
from river import base, datasets, dummy, feature_extraction, linear_model, metrics, preprocessing, stats

from streamflow.config import ConfigError, load_pipeline
from streamflow.config.models import BatchConfig, ModelConfig
from streamflow.metrics import PipelineMetrics
from streamflow.metrics.history import History
from streamflow.ml.checkpoint import CheckpointStore, publish
from streamflow.ml.engine import EngineSettings, ModelEngine, Promotion, PromotionRule
from streamflow.ml.features import pickled_feature_rows
from streamflow.ml.model import RiverModel
from streamflow.ml.registry import Registry
from streamflow.ml.spec import infer_task
from streamflow.ml.worker import EngineSpec
from streamflow.runtime.model_stage import ModelStage
from streamflow.runtime.stages import StageIdentity
from streamflow.transport import OutgoingBatch, TopicSpec, read_until
from streamflow.transport.memory import MemoryTransport, drop_cluster
from tests.stage_harness import finish, wait_until

TOPIC = "features"
BANANAS = list(datasets.Bananas())
RULE = PromotionRule("Accuracy", by=0.05, over=500, evaluations=3)


def logistic() -> Any:
    return preprocessing.StandardScaler() | linear_model.LogisticRegression()


def poly() -> Any:
    """Logistic regression on the degree-3 polynomial features: its frontier can bend."""
    return (preprocessing.StandardScaler() | feature_extraction.PolynomialExtender(degree=3)
            | linear_model.LogisticRegression())


POLY_SPEC = [{"preprocessing.StandardScaler": {}},
             {"feature_extraction.PolynomialExtender": {"degree": 3}},
             {"linear_model.LogisticRegression": {}}]


def own_predictions(estimator: Any, stream: list[tuple[dict[str, Any], Any]]) -> list[Any]:
    """The estimator's progressive predictions on its own: predict each record, then learn it.
    A model stage asks a classifier for its probabilities too, after the class, and so does
    this (an estimator may keep state across the two calls)."""
    predictions = []
    for x, y in stream:
        predictions.append(estimator.predict_one(x))
        if isinstance(estimator, base.Classifier):
            estimator.predict_proba_one(x)
        estimator.learn_one(x, y)
    return predictions


def rolling_accuracy(truth: list[Any], predicted: list[Any]) -> float:
    metric = metrics.Accuracy()
    for y, p in zip(truth, predicted, strict=True):
        metric.update(y, p)
    return metric.get()


class Run:
    """An engine on partition 0 of ``TOPIC`` with challengers, and what it published."""

    def __init__(self, store: Path, champion: Any, challengers: dict[str, Any],
                 rule: PromotionRule | None = RULE, metric: str = "Accuracy") -> None:
        task = infer_task(champion)
        settings = EngineSettings(
            task=task, target="y", metrics=[metric], rolling_window=200, key_field=None,
            max_models=1, features_topic=TOPIC, challengers=tuple(challengers), promotion=rule)
        self.promotions: list[Promotion] = []
        self.engine = ModelEngine(
            settings, lambda: RiverModel(champion.clone(), task),
            CheckpointStore(store, "p", "model"),
            new_challengers={name: lambda estimator=estimator: RiverModel(estimator.clone(), task)
                             for name, estimator in challengers.items()},
            on_promoted=self.promotions.append)
        self.engine.assign(0)
        self.published: list[Any] = []
        self.versions: list[int] = []

    def feed(self, stream: list[tuple[dict[str, Any], Any]], start: int = 0,
             batch: int = 100) -> Run:
        for first in range(start, len(stream), batch):
            chunk = stream[first:first + batch]
            run = self.engine.score(0, list(range(first, first + len(chunk))), [None] * len(chunk),
                                    [x for x, _ in chunk], [y for _, y in chunk], [""] * len(chunk))
            self.published += run.predictions.values
            self.versions += run.versions
        return self


def test_a_clearly_better_challenger_is_promoted_and_predicts_from_the_recorded_offset(
    tmp_path: Path,
) -> None:
    run = Run(tmp_path, logistic(), {"poly": poly(), "still": dummy.NoChangeClassifier()}).feed(BANANAS)

    assert [(p.promoted, p.demoted, p.offset) for p in run.promotions] == [("poly", "main", 1500)]
    promotion = run.promotions[0]
    # Evaluations after records 500, 1000 and 1500 (batches of 100): three won in a row.
    truth = [y for _, y in BANANAS]
    by_poly, by_logistic = own_predictions(poly(), BANANAS), own_predictions(logistic(), BANANAS)
    assert promotion.promoted_value == pytest.approx(rolling_accuracy(truth[1000:1500],
                                                                      by_poly[1000:1500]))
    assert promotion.demoted_value == pytest.approx(rolling_accuracy(truth[1000:1500],
                                                                     by_logistic[1000:1500]))
    assert promotion.promoted_value - promotion.demoted_value >= RULE.by
    # Published: the champion's own progressive predictions, then the challenger's, switching
    # exactly at the promotion's offset.
    assert run.published[:1500] == by_logistic[:1500]
    assert run.published[1500:] == by_poly[1500:]
    assert run.versions == list(range(len(BANANAS)))  # both learned every record
    # Each model is measured on its own predictions; the stage's metric on what it published.
    standings = run.engine.standings(0)
    assert {name: s["champion"] for name, s in standings.items()} == {
        "poly": True, "main": False, "still": False}
    assert standings["poly"]["metrics"]["Accuracy"]["cumulative"] == pytest.approx(
        rolling_accuracy(truth, by_poly), abs=1e-12)
    assert standings["main"]["metrics"]["Accuracy"]["cumulative"] == pytest.approx(
        rolling_accuracy(truth, by_logistic), abs=1e-12)
    assert standings["main"]["metrics"]["Accuracy"]["rolling"] == pytest.approx(
        rolling_accuracy(truth[-200:], by_logistic[-200:]), abs=1e-12)
    assert run.engine.states[0].metrics[0].cumulative.get() == pytest.approx(
        rolling_accuracy(truth, run.published), abs=1e-12)
    assert all(s["records_learned"] == len(BANANAS) for s in standings.values())


def test_no_promotion_when_no_challenger_is_better(tmp_path: Path) -> None:
    """The strictest rule (any margin, one evaluation) against a worse model, a model that
    never changes its mind, and a twin of the champion (equal is not better)."""
    eager = PromotionRule("Accuracy", by=0.0, over=250, evaluations=1)
    run = Run(tmp_path, poly(), {"logistic": logistic(), "still": dummy.NoChangeClassifier(),
                                "twin": poly()}, eager).feed(BANANAS)
    assert run.promotions == []
    assert run.published == own_predictions(poly(), BANANAS)
    assert run.engine.standings(0)["main"]["champion"]
    assert run.engine.states[0].challenge is not None
    assert run.engine.states[0].challenge.streaks == {"logistic": 0, "still": 0, "twin": 0}


def test_a_smaller_is_better_metric_promotes_the_smaller_error(tmp_path: Path) -> None:
    stream = list(datasets.TrumpApproval())
    mean = dummy.StatisticRegressor(stats.Mean())
    scaled = preprocessing.StandardScaler() | linear_model.LinearRegression()
    rule = PromotionRule("MAE", by=0.2, over=200, evaluations=2)
    # After 200 records the regression's MAE is 4.4 against the mean's 2.1: not yet better.
    promoted = Run(tmp_path / "a", mean, {"regression": scaled}, rule, "MAE").feed(stream)
    assert [(p.promoted, p.offset) for p in promoted.promotions] == [("regression", 600)]
    assert promoted.promotions[0].promoted_value < promoted.promotions[0].demoted_value - 0.2
    kept = Run(tmp_path / "b", scaled, {"mean": mean}, rule, "MAE").feed(stream)
    assert kept.promotions == []


def test_without_a_rule_challengers_are_measured_and_never_promoted(tmp_path: Path) -> None:
    run = Run(tmp_path, logistic(), {"poly": poly()}, rule=None).feed(BANANAS[:1000])
    assert run.promotions == []
    assert run.published == own_predictions(logistic(), BANANAS[:1000])
    assert "promotion" not in run.engine.standings(0)["poly"]


def test_challengers_are_checkpointed_with_the_champion(tmp_path: Path) -> None:
    """A restart before the promotion and one after it end as an uninterrupted run does."""
    whole = Run(tmp_path / "whole", logistic(), {"poly": poly()}).feed(BANANAS)
    for stop in (1200, 2000):
        store = tmp_path / f"stopped-{stop}"
        first = Run(store, logistic(), {"poly": poly()}).feed(BANANAS[:stop])
        first.engine.checkpoint()
        first.feed(BANANAS[:stop + 300], start=stop)  # learned past the checkpoint, then lost
        restored = Run(store, logistic(), {"poly": poly()})
        assert restored.engine.committable() == {(TOPIC, 0): stop}
        restored.feed(BANANAS, start=stop)
        assert first.published[:stop] + restored.published == whole.published
        before = [p for p in first.promotions if p.offset <= stop]
        assert [(p.promoted, p.offset) for p in before + restored.promotions] == [("poly", 1500)]
        assert restored.engine.standings(0) == whole.engine.standings(0)


def test_a_restart_with_other_challengers_keeps_the_champion_and_the_models_still_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    first = Run(tmp_path, logistic(), {"poly": poly(), "still": dummy.NoChangeClassifier()})
    first.feed(BANANAS[:2000]).engine.checkpoint()
    assert first.engine.standings(0)["poly"]["champion"]
    with caplog.at_level(logging.WARNING, "streamflow.ml.engine"):
        changed = Run(tmp_path, logistic(), {"prior": dummy.PriorClassifier()})
        changed.feed(BANANAS[:2100], start=2000)
    assert "challengers ['still'] are configured no more: dropped" in caplog.text
    standings = changed.engine.standings(0)
    assert {name: (s["champion"], s["records_learned"]) for name, s in standings.items()} == {
        "poly": (True, 2100), "main": (False, 2100), "prior": (False, 100)}
    changed.engine.checkpoint()
    alone = Run(tmp_path, logistic(), {}).feed(BANANAS[:2200], start=2100)
    assert alone.engine.states[0].challenge is None
    assert alone.published == own_predictions(poly(), BANANAS[:2200])[2100:]  # still the champion


def test_registry_versions_carry_each_models_standing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the worker process, as a stage runs it: the challengers are built from their
    specs there, and the version a checkpoint makes records every model's metrics, which
    ``models list`` sums up with the champion of each partition."""
    from streamflow.cli import main
    from streamflow.ml.worker import BatchRequest, EngineWorker

    settings = EngineSettings(task="classification", target="y", metrics=["Accuracy"],
                              rolling_window=100, key_field=None, max_models=1,
                              features_topic=TOPIC, challengers=("poly",),
                              promotion=PromotionRule("Accuracy", 0.05, 200, 1))
    spec = EngineSpec(settings, [{"linear_model.LogisticRegression": {}}], str(tmp_path), "p",
                      "model", 10_000, keep_versions=5,
                      challengers={"poly": POLY_SPEC})
    stream = BANANAS[:400]
    request = BatchRequest(
        features=pickled_feature_rows(pa.Table.from_pylist([x for x, _ in stream])),
        partitions=np.zeros(len(stream), dtype=np.int64),
        offsets=np.arange(len(stream)), targets=[y for _, y in stream], metric_values=True)
    promotions: list[Promotion] = []
    worker = EngineWorker(spec, "w", lambda effects: promotions.extend(effects.promotions))
    try:
        worker.call("start", None)
        worker.call("assign", [0])
        reply = worker.call("handle", request)
        assert reply.checkpoint_due  # a version at each promotion
        assert reply.standings[0]["poly"]["champion"] is True
        assert [(p.promoted, p.offset) for p in promotions] == [("poly", 400)]
        checkpointed = worker.call("checkpoint")
        publish(checkpointed.staged)
    finally:
        worker.close()
    assert checkpointed.standings == reply.standings
    (version,) = Registry.of_stage(tmp_path, "p", "model").versions()
    partition = version.metadata["partitions"][f"{TOPIC}+0"]
    assert partition["promotions"] == 1
    assert partition["models"]["poly"]["champion"] is True
    assert partition["models"]["main"]["metrics"]["Accuracy"]["cumulative"] == \
        reply.standings[0]["main"]["metrics"]["Accuracy"]["cumulative"]
    assert set(partition["models"]["poly"]["promotion"]) == {"value", "wins"}
    file = pipeline(tmp_path, name="model", checkpoint={"path": str(tmp_path)},
                    challengers=[{"name": "poly", "estimator": POLY_SPEC}])
    assert main(["models", "list", str(file)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert "champion" in header.split() and row.endswith("0:poly")


def test_the_dashboard_draws_a_line_per_model() -> None:
    pipeline_metrics = PipelineMetrics("p")
    model = pipeline_metrics.model("predict", "StandardScaler|LogisticRegression")
    model.metric("Accuracy", "rolling", 0).set(0.9)
    model.candidate_metric("main", "Accuracy", "rolling", 0).set(0.5)
    model.candidate_metric("poly", "Accuracy", "rolling", 0).set(0.9)
    model.candidate_metric("poly", "Accuracy", "rolling", 1).set(0.8)
    model.champion("poly", 0).set(1)
    model.champion("main", 0).set(0)
    history = History(pipeline_metrics.registry)
    assert history.sample().charts["model"] == {
        "predict Accuracy (rolling)": 0.9, "predict/main Accuracy (rolling)": 0.5,
        "predict/poly Accuracy (rolling)": pytest.approx(0.85)}
    assert history.document()["champions"] == {"predict": ["poly"]}
    model.champion("main", 1).set(1)  # partition 1 has kept its own
    history.sample()
    assert history.document(after=time.time() + 60)["champions"] == {"predict": ["main", "poly"]}


# --- validation -------------------------------------------------------------------------------


def pipeline(tmp_path: Path, **model: Any) -> Path:
    data = {
        "pipeline": "p",
        "sources": [{"name": "gen", "type": "generator", "topic": "raw", "count": 10}],
        "models": [{"name": "m", "input": "raw", "output": "scored", "target": "y",
                    "estimator": [{"linear_model.LogisticRegression": {}}], **model}],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def errors(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    return info.value.errors


def test_challengers_and_the_rule_are_read_from_the_pipeline_file(tmp_path: Path) -> None:
    config = load_pipeline(pipeline(
        tmp_path, challengers=[{"name": "tree", "estimator": [{"tree.HoeffdingTreeClassifier": {}}]}],
        promotion={"metric": "Accuracy", "by": 0.01, "over": 5000, "evaluations": 3}))
    model = config.models[0]
    assert [c.name for c in model.challengers] == ["tree"]
    assert model.promotion is not None and model.promotion.by == 0.01
    assert config.models_topic(model) == "p.models"
    assert "p.models" in [topic.name for topic in config.topic_specs()]


def test_challengers_are_checked_like_the_estimator(tmp_path: Path) -> None:
    found = errors(pipeline(tmp_path, challengers=[
        {"name": "typo", "estimator": [{"linear_model.LogisticRegresion": {}}]},
        {"name": "regressor", "estimator": [{"linear_model.LinearRegression": {}}]},
        {"name": "factory", "estimator": "os:system"},
        {"name": "fine", "estimator": [{"tree.HoeffdingTreeClassifier": {}}]},
    ], promotion={"metric": "MAE"}))
    assert found == [
        "models[0].challengers[0].estimator: river has no 'linear_model.LogisticRegresion' "
        "(did you mean 'linear_model.LogisticRegression'?)",
        "models[0].challengers[1].estimator: a regression estimator cannot challenge the "
        "stage's classification estimator",
        "models[0].challengers[2].estimator: estimator factory 'os:system' is from Python's "
        "standard library, not a model; name a river estimator, e.g. "
        "[{linear_model.LinearRegression: {}}], or a function of your own module that returns "
        "one, e.g. 'my_models:build'",
        "models[0].promotion.metric: MAE does not measure classification models",
    ]
    assert errors(pipeline(tmp_path, challengers=[{"name": "a", "estimator": "tests.estimators:picky"}],
                           promotion={"metric": "Acuracy"})) == [
        "models[0].promotion.metric: river.metrics has no metric 'Acuracy' (did you mean "
        "'Accuracy'?)"]


@pytest.mark.parametrize(("settings", "message"), [
    ({"key_field": "device"}, "challengers do not go with key_field: each key has a model of its "
                              "own, which one challenger cannot replace"),
    ({"labels": {"topic": "labels"}}, "challengers do not go with a labels topic"),
    ({"challengers": [{"name": "main", "estimator": "a:b"}]}, "'main' names the stage's own"),
    ({"challengers": [{"name": "a", "estimator": "a:b"}, {"name": "a", "estimator": "a:c"}]},
     "names must be unique; ['a'] appear twice"),
    ({"challengers": [], "promotion": {"metric": "Accuracy"}}, "there is no challenger to promote"),
])
def test_challengers_that_cannot_work_are_refused(tmp_path: Path, settings: dict[str, Any],
                                                  message: str) -> None:
    challengers = {"challengers": [{"name": "tree", "estimator": [{"tree.HoeffdingTreeClassifier": {}}]}]}
    found = errors(pipeline(tmp_path, **{**challengers, **settings}))
    assert any(message in error and error.startswith("models[0]") for error in found), found


def test_an_anomaly_stage_takes_challengers_but_no_promotion(tmp_path: Path) -> None:
    trees = [{"anomaly.HalfSpaceTrees": {"seed": 1}}]
    path = pipeline(tmp_path, estimator=trees, challengers=[{"name": "b", "estimator": trees}])
    assert load_pipeline(path).models[0].challengers[0].name == "b"
    found = errors(pipeline(tmp_path, estimator=trees, challengers=[{"name": "b", "estimator": trees}],
                            promotion={"metric": "Accuracy"}))
    assert found == ["models[0].promotion: an anomaly stage has no target to measure its models "
                     "against; promotion needs a regression or classification stage"]


# --- the stage, on the in-memory transport ----------------------------------------------------


@pytest.fixture
def cluster() -> Iterator[str]:
    name = f"memory://challengers-{uuid.uuid4().hex[:10]}"
    yield name
    drop_cluster(name)


def test_a_stage_publishes_the_champions_predictions_and_the_promotion(
    cluster: str, tmp_path: Path,
) -> None:
    """The stage's output switches from the champion's own predictions to the challenger's at
    the offset its record on the models topic gives, and the swap is counted and gauged."""
    transport = MemoryTransport(cluster)
    admin = transport.admin()
    admin.create_topics([TopicSpec("bananas", 1), TopicSpec("scored", 1), TopicSpec("p.models", 1),
                         TopicSpec("p.dlq", 1)])
    producer = transport.producer()
    producer.produce([OutgoingBatch("bananas", [json.dumps({**x, "y": y}).encode()
                                                for x, y in BANANAS])])
    producer.close()
    config = ModelConfig.model_validate({
        "name": "model", "input": "bananas", "output": "scored", "target": "y",
        "estimator": [{"preprocessing.StandardScaler": {}}, {"linear_model.LogisticRegression": {}}],
        "challengers": [{"name": "poly", "estimator": POLY_SPEC}],
        "promotion": {"metric": "Accuracy", "by": 0.05, "over": 500, "evaluations": 3},
        "checkpoint": {"path": str(tmp_path), "every_records": 1000},
    })
    settings = EngineSettings(task="classification", target="y", metrics=["Accuracy"],
                              rolling_window=500, key_field=None, max_models=1,
                              features_topic="bananas", challengers=("poly",),
                              promotion=PromotionRule("Accuracy", 0.05, 500, 3))
    spec = EngineSpec(settings, config.estimator, str(tmp_path), "p", "model", 1000,
                      challengers={"poly": POLY_SPEC})
    pipeline_metrics = PipelineMetrics("p")
    model_metrics = pipeline_metrics.model("model", "StandardScaler|LogisticRegression")
    stage = ModelStage(StageIdentity("p", "model", "bananas", "p.dlq"), transport,
                       BatchConfig(max_records=200, max_wait_ms=10),
                       pipeline_metrics.stage("model", ("model",)),
                       partial(pipeline_metrics.model, "model"), config, spec,
                       None, models_topic="p.models")
    stage.start()
    wait_until(lambda: sum(transport.cluster.high_watermarks("scored").values()) == len(BANANAS),
               "the stage's output")
    finish(stage)

    start = {("scored", 0): 0}
    records = [json.loads(value or b"") for batch in read_until(transport, start)
               for value in batch.values]
    (promotion,) = [json.loads(value or b"") for batch in read_until(transport, {("p.models", 0): 0})
                    for value in batch.values]
    assert (promotion["promoted"], promotion["demoted"], promotion["partition"]) == ("poly", "main", 0)
    offset = promotion["offset"]
    assert 1500 <= offset < 2500  # evaluations end the first batches after 500, 1000, 1500 records
    published = [record["prediction"] for record in records]
    assert published[:offset] == own_predictions(logistic(), BANANAS)[:offset]
    assert published[offset:] == own_predictions(poly(), BANANAS)[offset:]
    assert [record["model_version"] for record in records] == list(range(len(BANANAS)))
    assert promotion["model_version"] == offset
    assert model_metrics.promotions._value.get() == 1
    registry = pipeline_metrics.registry
    labels = {"pipeline": "p", "stage": "model", "model": "StandardScaler|LogisticRegression",
              "partition": "0"}
    assert registry.get_sample_value("streamflow_model_champion", {**labels, "candidate": "poly"}) == 1
    assert registry.get_sample_value("streamflow_model_champion", {**labels, "candidate": "main"}) == 0
    truth = [y for _, y in BANANAS]
    assert registry.get_sample_value("streamflow_model_candidate_metric", {
        **labels, "candidate": "main", "metric": "Accuracy", "window": "cumulative"}) == \
        pytest.approx(rolling_accuracy(truth, own_predictions(logistic(), BANANAS)), abs=1e-12)
    assert registry.get_sample_value("streamflow_model_metric", {
        **labels, "metric": "Accuracy", "window": "cumulative"}) == \
        pytest.approx(rolling_accuracy(truth, published), abs=1e-12)


def test_a_backfill_publishes_its_promotions_apart_from_the_live_ones() -> None:
    from streamflow.config.loader import parse_pipeline
    from streamflow.runtime.backfill import backfill_config, entry_topics

    def bounded(promotion: dict[str, Any]) -> tuple[list[str], str]:
        config = parse_pipeline({
            "pipeline": "shop", "kafka": {"bootstrap": "localhost:9092"},
            "models": [{"name": "model", "input": "orders", "output": "scored", "target": "y",
                        "estimator": [{"linear_model.LogisticRegression": {}}],
                        "challengers": [{"name": "poly", "estimator": POLY_SPEC}],
                        "promotion": promotion}],
            "topics": [{"name": "promotions"}]})
        copy = backfill_config(config, "s")
        return entry_topics(config), copy.models_topic(copy.models[0])

    assert bounded({"metric": "Accuracy"}) == (["orders"], "shop.s.models")
    assert bounded({"metric": "Accuracy", "topic": "promotions"}) == (["orders"], "promotions.s")


def test_a_rollback_restores_the_versions_champion_and_challengers(tmp_path: Path) -> None:
    run = Run(tmp_path, logistic(), {"poly": poly()}).feed(BANANAS[:1000])
    run.engine.checkpoint()
    _header, (state, models) = run.engine.store.load(f"{TOPIC}+0", "partition-state")
    run.feed(BANANAS[:2000], start=1000)
    assert run.engine.standings(0)["poly"]["champion"]
    run.engine.adopt(0, state, models, {"id": "r", "version": 1}, {})
    assert {name: (s["champion"], s["records_learned"])
            for name, s in run.engine.standings(0).items()} == {
        "main": (True, 1000), "poly": (False, 1000)}
    assert run.engine.committable() == {(TOPIC, 0): 2000}  # the offsets go on
    run.feed(BANANAS[:2100], start=2000)
    assert run.versions[-100:] == list(range(1000, 1100))  # main, as it was at the version
