"""Model stages without Kafka: estimator specs, progressive validation, delayed labels, keyed
models, drift, mini-batches and checkpoints."""

from __future__ import annotations

import dataclasses
import gc
import io
import itertools
import json
import logging
import os
import pickle
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river import datasets, evaluate, linear_model, metrics, preprocessing, utils

from streamflow.ml.checkpoint import (
    KEY_VARIABLE,
    MAGIC,
    CheckpointError,
    CheckpointStore,
    Integrity,
    _dumps,
    _Unpickler,
    _write_sidecar,
    publish,
)
from streamflow.ml.engine import EngineSettings, ModelEngine, TrackedMetric
from streamflow.ml.model import Prediction, RiverModel
from streamflow.ml.spec import ModelSpecError, build_estimator, build_metric, infer_task

TOPIC = "features"


def test_estimators_resolve_only_inside_river() -> None:
    model = build_estimator([{"preprocessing.StandardScaler": {}},
                             {"linear_model.LogisticRegression": {"l2": 0.001}}])
    assert [type(step).__name__ for step in model.steps.values()] == [
        "StandardScaler", "LogisticRegression"]
    assert infer_task(model) == "classification"
    assert infer_task(build_estimator([{"anomaly.HalfSpaceTrees": {}}])) == "anomaly"
    assert infer_task(build_estimator([{"cluster.KMeans": {}}])) == "clustering"
    for bad in ("os.system", "__import__('os')", "linear_model.__class__", "..x.Y"):
        with pytest.raises(ModelSpecError):
            build_estimator([{bad: {}}])
    with pytest.raises(ModelSpecError, match="river has no"):
        build_estimator([{"linear_model.NoSuchModel": {}}])
    with pytest.raises(ModelSpecError, match="must be"):
        build_estimator("not a factory")
    with pytest.raises(ModelSpecError, match="no metric"):
        build_metric("__class__")


def test_factory_names_a_user_function() -> None:
    assert isinstance(build_estimator("river.linear_model:LinearRegression"),
                      linear_model.LinearRegression)


REFUSED_FACTORIES = [
    "os:system", "os:abort", "builtins:eval", "builtins:__import__", "sys:exit", "subprocess:Popen",
    "shutil:rmtree", "importlib:import_module", "pickle:loads", "ctypes:CDLL", "socket:socket",
    "multiprocessing:Process", "runpy:run_path", "code:interact", "os.path:exists", "streamflow.cli:main",
]


@pytest.mark.parametrize("factory", REFUSED_FACTORIES)
def test_factories_outside_river_and_user_modules_are_refused_uncalled(factory: str) -> None:
    with pytest.raises(ModelSpecError, match=r"from (Python's standard library|streamflow itself).*"
                                             r"'my_models:build'"):
        build_estimator(factory)


def test_user_module_may_not_hand_on_a_standard_library_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "handed_on.py").write_text(
        "import functools\nfrom os import abort\nfrom subprocess import Popen\n"
        "from river import linear_model\n"
        "partial = functools.partial(linear_model.LinearRegression)\nnumber = 3\n"
        "def build():\n    return linear_model.LinearRegression()\n"
        "def not_a_model():\n    return {}\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModelSpecError, match=r"is a builtin_function_or_method, not a function"):
        build_estimator("handed_on:abort")
    with pytest.raises(ModelSpecError, match=r"is subprocess\.Popen, from Python's standard library"):
        build_estimator("handed_on:Popen")
    for name in ("partial", "number"):
        with pytest.raises(ModelSpecError, match="not a function or class written in Python"):
            build_estimator(f"handed_on:{name}")
    with pytest.raises(ModelSpecError, match="returned a dict, not a river estimator"):
        build_estimator("handed_on:not_a_model")
    assert isinstance(build_estimator("handed_on:build"), linear_model.LinearRegression)


def engine(tmp_path: Path, estimator: Any, task: str, metric_names: list[str],
           **overrides: Any) -> ModelEngine:
    settings = EngineSettings(
        task=task, target="y", metrics=metric_names, rolling_window=50, key_field=None,
        max_models=10, features_topic=TOPIC, **overrides,
    )
    store = CheckpointStore(tmp_path, "p", "model")
    built = ModelEngine(settings, lambda: RiverModel(estimator.clone(), task), store)
    built.assign(0)
    return built


def feed(eng: ModelEngine, stream: list[tuple[dict[str, Any], Any]], start: int = 0,
         batch: int = 100, keys: list[str] | None = None) -> None:
    for first in range(start, len(stream), batch):
        chunk = stream[first:first + batch]
        eng.score(0, list(range(first, first + len(chunk))), [None] * len(chunk),
                  [x for x, _ in chunk], [y for _, y in chunk],
                  keys[first:first + len(chunk)] if keys else [""] * len(chunk))


@pytest.mark.parametrize(("dataset", "estimator", "metric"), [
    (datasets.TrumpApproval(), preprocessing.StandardScaler() | linear_model.LinearRegression(),
     "MAE"),
    (datasets.Phishing(), preprocessing.StandardScaler() | linear_model.LogisticRegression(),
     "LogLoss"),
    (datasets.Phishing(), preprocessing.StandardScaler() | linear_model.LogisticRegression(),
     "Accuracy"),
])
def test_engine_agrees_with_river(tmp_path: Path, dataset: Any, estimator: Any,
                                  metric: str) -> None:
    stream = list(dataset)
    expected = evaluate.progressive_val_score(stream, estimator.clone(), getattr(metrics, metric)())
    eng = engine(tmp_path, estimator, infer_task(estimator), [metric])
    feed(eng, stream)
    assert eng.states[0].metrics[0].cumulative.get() == pytest.approx(expected.get(), abs=1e-9)


def test_mini_batches_predict_the_batch_before_learning_it(tmp_path: Path) -> None:
    stream = list(itertools.islice(datasets.TrumpApproval(), 300))
    eng = engine(tmp_path, preprocessing.StandardScaler() | linear_model.LinearRegression(),
                 "regression", ["MAE"], mini_batch=True)
    feed(eng, stream, batch=100)
    slot = eng.slot(0, "")
    assert slot.learned == 300
    # The first batch was predicted by an untrained model: every prediction is 0.
    assert eng.states[0].metrics[0].cumulative.get() > 0


def test_restored_state_skips_what_it_already_covered(tmp_path: Path) -> None:
    stream = list(itertools.islice(datasets.TrumpApproval(), 600))
    estimator = preprocessing.StandardScaler() | linear_model.LinearRegression()
    whole = engine(tmp_path / "whole", estimator, "regression", ["MAE"])
    feed(whole, stream)

    first = engine(tmp_path / "crash", estimator, "regression", ["MAE"])
    feed(first, stream[:300])
    first.checkpoint()
    feed(first, stream[:450])  # processed past the checkpoint, then "crashed"
    restored = engine(tmp_path / "crash", estimator, "regression", ["MAE"])
    assert restored.committable() == {(TOPIC, 0): 300}
    feed(restored, stream[:600], start=200)  # redelivery starts before the checkpoint
    assert restored.states[0].metrics[0].cumulative.get() == whole.states[0].metrics[0].cumulative.get()
    assert restored.slot(0, "").model.estimator["LinearRegression"].weights == \
        whole.slot(0, "").model.estimator["LinearRegression"].weights


def test_delayed_labels_learn_when_the_label_arrives(tmp_path: Path) -> None:
    eng = engine(tmp_path, linear_model.LinearRegression(), "regression", ["MAE"],
                 labels_topic="labels", labels_ttl_s=60, max_waiting=2)
    expired: list[int] = []
    unmatched: list[int] = []
    eng._on_expired = expired.append
    eng._on_unmatched = lambda: unmatched.append(1)
    eng.score(0, [0, 1, 2], [b"a", b"b", b"c"], [{"x": 1.0}, {"x": 2.0}, {"x": 3.0}],
              [None] * 3, [""] * 3)
    assert sum(expired) == 1  # max_waiting=2 pushed out the oldest ("a")
    assert eng.slot(0, "").learned == 0, "nothing is learned before its label"
    eng.label(0, 0, b"b", 4.0)
    eng.label(0, 1, b"a", 2.0)  # its features were pushed out
    assert eng.slot(0, "").learned == 1
    assert unmatched == [1]
    assert eng.states[0].metrics[0].cumulative.get() == pytest.approx(4.0)  # predicted 0 for 4
    eng.expire(now=10**12)
    assert not eng.states[0].waiting and sum(expired) == 2


def test_keyed_models_are_evicted_to_the_store_and_come_back(tmp_path: Path) -> None:
    settings_keys = [f"device-{i % 3}" for i in range(30)]
    stream = [({"x": float(i)}, float(2 * i)) for i in range(30)]
    eng = engine(tmp_path, linear_model.LinearRegression(), "regression", ["MAE"])
    eng.settings = EngineSettings(**{**eng.settings.__dict__, "key_field": "device",
                                     "max_models": 2})
    evictions: list[int] = []
    eng._on_evicted = lambda: evictions.append(1)
    feed(eng, stream, keys=settings_keys, batch=7)
    assert len(eng.slots) == 2 and evictions
    assert sum(eng.slot(0, f"device-{i}").learned for i in range(3)) == 30
    assert all(eng.slot(0, f"device-{i}").learned == 10 for i in range(3))


def test_drift_resets_the_model(tmp_path: Path) -> None:
    stream = [({"x": 1.0}, 1.0)] * 500 + [({"x": 1.0}, 50.0)] * 500
    eng = engine(tmp_path, linear_model.LinearRegression(), "regression", ["MAE"],
                 drift_detector={"drift.PageHinkley": {"mode": "up"}},
                 drift_policy="reset")
    events: list[Any] = []
    eng._on_drift = events.append
    feed(eng, stream)
    assert events and events[0].offset >= 500
    assert eng.states[0].drift_events == len(events)


def test_checkpoints_check_magic_and_version(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "p", "s")
    store.save("a", "model", {"w": 1})
    assert store.load("a", "model") is not None
    assert store.load("missing", "model") is None
    path = store.path("a")
    path.write_bytes(MAGIC + b'{"format": 99, "kind": "model", "name": "a"}\n')
    with pytest.raises(CheckpointError, match="format 99"):
        store.load("a", "model")
    path.write_bytes(b"not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a streamflow checkpoint"):
        store.load("a", "model")


class MakesADirectory:
    """A payload that, once unpickled, has created the directory it names."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.path),)


def tampered(store: CheckpointStore, name: str, payload: object) -> bytes:
    """The checkpoint ``name`` with its pickle replaced by ``payload``'s, header untouched."""
    path = store.path(name)
    header = path.read_bytes().split(b"\n", 2)[1]
    data = MAGIC + header + b"\n" + pickle.dumps(payload)
    path.write_bytes(data)
    return data


def test_checkpoints_are_written_0600_in_a_0700_directory(tmp_path: Path) -> None:
    (tmp_path / "p" / "s").mkdir(parents=True, mode=0o755)  # as an earlier streamflow left it
    previous = os.umask(0)
    try:
        store = CheckpointStore(tmp_path, "p", "s")
        store.save("a", "model", {"w": 1})
        fresh = CheckpointStore(tmp_path / "new", "p", "s")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert {path.name.rsplit(".", 1)[1]: stat.S_IMODE(path.stat().st_mode)
            for path in store.directory.iterdir()} == {"ckpt": 0o600, "digest": 0o600}
    assert [stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "new", fresh.directory.parent,
                                                             fresh.directory)] == [0o700] * 3


def test_a_tampered_checkpoint_is_refused_before_its_payload_runs(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "p", "s")
    store.save("a", "model", {"w": 1})
    marker = tmp_path / "payload-ran"
    data = tampered(store, "a", MakesADirectory(marker))
    with pytest.raises(CheckpointError, match="does not match the sha256 recorded when it was written"):
        store.load("a", "model")
    assert not marker.exists()
    _Unpickler(io.BytesIO(data.split(b"\n", 2)[2])).load()
    assert marker.is_dir()  # the payload does run when unpickled: the check is what stopped it


def test_a_checkpoint_without_its_integrity_record_is_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "p", "s")
    store.save("a", "model", {"w": 1})
    (store.directory / (store.path("a").name + ".digest")).unlink()
    with pytest.raises(CheckpointError, match=r"has no integrity record .*move it aside"):
        store.load("a", "model")
    store.path("a").write_bytes(MAGIC + b'{"format": 3, "kind": "model", "name": "a"}\n'
                                + pickle.dumps({"w": 1}))
    with pytest.raises(CheckpointError, match=r"format 3; .*\(format 4 added the integrity check"):
        store.load("a", "model")


def test_with_a_key_checkpoints_carry_an_hmac(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_VARIABLE, "a secret of the operator's")
    store = CheckpointStore(tmp_path, "p", "s")
    store.save("a", "model", {"w": 1})
    assert store.load("a", "model")[1] == {"w": 1}
    data = tampered(store, "a", MakesADirectory(tmp_path / "payload-ran"))
    with pytest.raises(CheckpointError, match="does not match the hmac-sha256 recorded"):
        store.load("a", "model")
    for integrity in (Integrity("hmac-sha256", b"a guessed key"), Integrity("sha256", None)):
        _write_sidecar(store.path("a"), integrity.algorithm, [integrity.tag(data)])
        with pytest.raises(CheckpointError, match="does not match|recorded with sha256, but this process "
                                                  f"uses hmac-sha256 \\({KEY_VARIABLE} is set\\)"):
            store.load("a", "model")
    assert not (tmp_path / "payload-ran").exists()
    store.save("a", "model", {"w": 2})
    monkeypatch.delenv(KEY_VARIABLE)
    with pytest.raises(CheckpointError, match=f"{KEY_VARIABLE} is not set"):
        CheckpointStore(tmp_path, "p", "s").load("a", "model")


def test_checkpoints_others_may_write_or_own_are_refused(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "p", "s")
    store.save("a", "model", {"w": 1})
    path = store.path("a")
    path.chmod(0o620)
    with pytest.raises(CheckpointError, match=r"may be written by others \(mode 620\).*chmod go-w"):
        store.load("a", "model")
    path.chmod(0o600)
    store.directory.chmod(0o707)
    with pytest.raises(CheckpointError, match="may be written by others"):
        store.load("a", "model")
    store.directory.chmod(0o700)
    sidecar = store.directory / (path.name + ".digest")
    sidecar.chmod(0o666)
    with pytest.raises(CheckpointError, match="digest may be written by others"):
        store.load("a", "model")
    sidecar.chmod(0o600)
    path.rename(tmp_path / "elsewhere")
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="never through a symbolic link"):
        store.load("a", "model")
    path.unlink()
    (tmp_path / "elsewhere").rename(path)
    assert store.load("a", "model") is not None
    if os.geteuid() == 0:
        os.chown(path, 4321, -1)
        with pytest.raises(CheckpointError, match="is owned by uid 4321, not by this process's uid 0"):
            store.load("a", "model")


def test_an_interrupted_publish_leaves_a_checkpoint_that_loads(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "p", "s")
    store.save("a", "model", {"w": 1})
    path = store.path("a")
    for crash_after_rename in (False, True):
        before = store.load("a", "model")[1]
        snapshot = store.snapshot("a", "model", {"w": before["w"] + 1})
        staged = snapshot.staged(1)
        snapshot.write_staged(staged)
        old = json.loads((store.directory / (path.name + ".digest")).read_bytes())["tags"]
        new = json.loads(staged.tag_file.read_bytes())["tag"]
        _write_sidecar(path, "sha256", [new, *old])  # the first step of publish, then a crash
        if crash_after_rename:
            os.replace(staged.temporary, path)
        expected = before["w"] + 1 if crash_after_rename else before["w"]
        assert store.load("a", "model")[1] == {"w": expected}
        store.save("a", "model", {"w": expected})  # a later checkpoint keeps only the tag in place
        assert json.loads((store.directory / (path.name + ".digest")).read_bytes())["tags"] == [
            Integrity("sha256", None).tag(path.read_bytes())]
        assert store.load("a", "model")[1] == {"w": expected}


def test_two_writers_of_a_checkpoint_stage_it_under_names_of_their_own(tmp_path: Path) -> None:
    """The owner of a partition that lost it (evicted from the group) drops its staged files as
    the next owner, a replica of the stage, stages the same partition's checkpoint, each as its
    first one: the next owner's files stay whole and publish."""
    store = CheckpointStore(tmp_path, "p", "s")
    evicted = store.snapshot("a", "partition-state", {"w": 1})
    dropped = evicted.staged(1)
    evicted.write_staged(dropped)
    next_owner = subprocess.run([sys.executable, "-c", (
        "import pickle, sys\n"
        "from streamflow.ml.checkpoint import CheckpointStore\n"
        f"snapshot = CheckpointStore({str(tmp_path)!r}, 'p', 's').snapshot("
        "'a', 'partition-state', {'w': 2})\n"
        "staged = snapshot.staged(1)\n"
        "snapshot.write_staged(staged)\n"
        "sys.stdout.buffer.write(pickle.dumps(staged))\n")],
        capture_output=True, check=True).stdout
    staged = pickle.loads(next_owner)
    for file in (dropped.temporary, dropped.tag_file):  # as ModelStage._drop_in_flight does
        file.unlink()
    publish([staged])
    assert store.load("a", "partition-state")[1] == {"w": 2}


def test_a_leftover_another_writer_publishes_meanwhile_does_not_stop_the_store(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica opening the store lists a staged file another replica renames before it is
    looked at (seen in CI: the model worker failed with FileNotFoundError); old ones still go."""
    store = CheckpointStore(tmp_path, "p", "s")
    stale = store.directory / "stale.tmp"
    stale.write_bytes(b"")
    os.utime(stale, (0, 0))
    listed = [store.directory / "published-meanwhile.tmp", stale]
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: iter(listed))
    CheckpointStore(tmp_path, "p", "s")
    assert not stale.exists()


class Weights:
    """An instance with a plain ``__dict__``, as river's estimators have."""

    def __init__(self) -> None:
        self.feature = "a-feature-name"
        self.counts = Counter({"a-feature-name": 3})


def attributes_inline(instance: object) -> bool:
    """Whether CPython keeps the instance's attributes inline, without a materialized __dict__
    (the faster form on 3.11 and 3.12), without materializing it by looking."""
    return not any(type(referent) is dict for referent in gc.get_referents(instance))


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="reads the object layout of CPython 3.11 and 3.12")
def test_a_restored_instance_keeps_its_attributes_inline_and_its_strings_interned() -> None:
    restored = _Unpickler(io.BytesIO(_dumps(Weights()))).load()
    assert attributes_inline(Weights()) and attributes_inline(restored)
    assert vars(restored) == vars(Weights())
    assert type(restored.counts) is Counter
    key = next(iter(restored.counts))
    assert key is sys.intern("a-feature-name") and restored.feature is key


@pytest.mark.skipif(not hasattr(os, "fork"), reason="checkpoints are written in process")
@pytest.mark.skipif(sys.version_info >= (3, 13), reason="reads the object layout of CPython 3.11 and 3.12")
def test_the_worker_writes_checkpoints_without_pickling_its_own_objects(tmp_path: Path) -> None:
    from streamflow.ml.host import _write_in_child

    store = CheckpointStore(tmp_path, "p", "s")
    live = Weights()
    snapshot = store.snapshot("a", "model", live)
    staged = snapshot.staged(1)
    _write_in_child([snapshot], [staged])()
    assert attributes_inline(live)  # pickled by the forked child, not here
    assert store.load("a", "model") is None  # staged, not in place yet
    publish([staged])
    loaded = store.load("a", "model")
    assert loaded is not None and vars(loaded[1]) == vars(live)


@pytest.mark.parametrize("original", [
    b'{"x":1.5}', b'{"x": 1.5 }', b"{}", b'{ "x":1}\n', b'{"prediction":3,"x":1}',
])
def test_model_output_json_is_valid_whatever_the_input_layout(original: bytes) -> None:
    from streamflow.processing.codec import decode_json
    from streamflow.runtime.model_stage import ModelStage

    table, failures = decode_json([original])
    assert not failures
    added = pa.table({"prediction": [2.5], "model_version": pa.array([7], pa.int64())})
    (encoded,) = ModelStage._encode(table.drop_columns(["_sf_row"]), [original], added)
    document = json.loads(encoded)
    assert document["prediction"] == 2.5 and document["model_version"] == 7
    assert document.get("x") == json.loads(original).get("x")


@settings(max_examples=60, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.floats(-1e3, 1e3), st.floats(-1e3, 1e3)), max_size=60),
    reads=st.sets(st.integers(0, 60)),
    window=st.integers(1, 12),
)
def test_rolling_value_matches_rivers_rolling_metric(
    pairs: list[tuple[float, float]], reads: set[int], window: int
) -> None:
    tracked = TrackedMetric.create("MAE", window, "regression")
    reference = utils.Rolling(metrics.MAE, window_size=window)
    for index, (target, predicted) in enumerate(pairs):
        tracked.update(target, Prediction(predicted))
        reference.update(target, predicted)
        if index in reads:
            assert tracked.rolling_value() == pytest.approx(reference.get(), abs=1e-9)
    assert tracked.rolling_value() == pytest.approx(reference.get(), abs=1e-9)


def test_the_worker_process_reports_logs_and_failures(tmp_path: Path) -> None:
    from streamflow.ml.worker import Effects, EngineSpec, EngineWorker, ModelWorkerError

    settings = EngineSettings(task="regression", target="y", metrics=["MAE"], rolling_window=5,
                              key_field=None, max_models=1, features_topic=TOPIC)
    spec = EngineSpec(settings, [{"linear_model.LinearRegression": {}}], str(tmp_path), "p", "m", 10)
    first = EngineWorker(spec, "first", lambda effects: None)
    try:
        first.call("start", "cluster-a")
        first.call("assign", [0])
        checkpointed = first.call("checkpoint")
        assert checkpointed.committable == {}
        assert checkpointed.metric_values == [(0, "MAE", 0.0, 0.0)]
        publish(checkpointed.staged)
    finally:
        first.close()
    effects: list[Effects] = []
    second = EngineWorker(spec, "second", effects.append)
    try:
        second.call("start", "cluster-b")
        second.call("assign", [0])
        logs = [(logger, level, message) for e in effects for logger, level, message in e.logs]
        assert any(logger == "streamflow.ml.engine" and level == logging.WARNING
                   and "taken on cluster cluster-a" in message for logger, level, message in logs)
        with pytest.raises(ModelWorkerError, match="no_such_call"):
            second.call("no_such_call")
        second.call("revoke", [0])  # still serving after a failed request
    finally:
        second.close()


def test_the_worker_writes_checkpoints_while_it_serves_and_replies_in_order(tmp_path: Path) -> None:
    import shutil

    import numpy as np

    from streamflow.ml.features import pickled_feature_rows
    from streamflow.ml.worker import BatchRequest, EngineSpec, EngineWorker, ModelWorkerError

    settings = EngineSettings(task="regression", target="y", metrics=["MAE"], rolling_window=5,
                              key_field=None, max_models=1, features_topic=TOPIC)
    spec = EngineSpec(settings, [{"linear_model.LinearRegression": {}}], str(tmp_path), "p", "m", 10)
    directory = tmp_path / "p" / "m"

    def batch(first: int) -> BatchRequest:
        offsets = np.arange(first, first + 3)
        features = pa.table({"x": offsets.astype(float)})
        return BatchRequest(features=pickled_feature_rows(features),
                            partitions=np.zeros(3, dtype=np.int64), offsets=offsets,
                            targets=[2.0 * i for i in offsets.tolist()])

    worker = EngineWorker(spec, "w", lambda effects: None)
    try:
        worker.call("start", None)
        worker.call("assign", [0])
        worker.submit("handle", batch(0))
        worker.submit("checkpoint")
        worker.submit("handle", batch(3))
        assert list(worker.receive().versions) == [0, 1, 2]
        checkpointed = worker.receive()
        assert checkpointed.committable == {(TOPIC, 0): 3}
        written = sorted(path.name for path in directory.iterdir())  # written, not in place
        assert [name.rsplit("-", 1)[1] for name in written] == ["1.tag.tmp", "1.tmp"]
        publish(checkpointed.staged)
        assert sorted(path.suffix for path in directory.iterdir()) == [".ckpt", ".digest"]
        assert list(worker.receive().versions) == [3, 4, 5]
        shutil.rmtree(directory)
        with pytest.raises(ModelWorkerError, match="FileNotFoundError"):
            worker.call("checkpoint")
        assert list(worker.call("handle", batch(6)).versions) == [6, 7, 8]  # still serving
    finally:
        worker.close()


def test_the_worker_tells_what_river_knows_of_the_spec(tmp_path: Path) -> None:
    """The stage's process leaves the task and the default metrics to the worker, which tells
    them, and the model's label, before any request."""
    from streamflow.ml.worker import EngineSpec, EngineWorker, Started

    settings = EngineSettings(task=None, target="y", metrics=None, rolling_window=5,
                              key_field=None, max_models=1, features_topic=TOPIC)
    spec = EngineSpec(settings, [{"preprocessing.StandardScaler": {}},
                                 {"linear_model.LogisticRegression": {}}], str(tmp_path), "p", "m", 10)
    worker = EngineWorker(spec, "w", lambda effects: None)
    try:
        assert worker.started() == Started("classification", ["Accuracy"],
                                           "StandardScaler|LogisticRegression")
        worker.call("start", None)
        worker.call("assign", [0])
        assert worker.call("checkpoint").metric_values == [(0, "Accuracy", 0.0, 0.0)]
    finally:
        worker.close()


@pytest.mark.parametrize(("change", "error"), [
    ({"estimator": [{"linear_model.LinearRegresion": {}}]},
     "river has no 'linear_model.LinearRegresion' (did you mean 'linear_model.LinearRegression'?)"),
    ({"metrics": ["MAE", "Nope"]}, "river.metrics has no metric 'Nope'"),
    ({"drift_detector": {"drift.ADWN": {}}}, "river has no 'drift.ADWN'"),
])
def test_a_spec_river_cannot_build_fails_the_worker_start(
    tmp_path: Path, change: dict[str, Any], error: str
) -> None:
    """What `streamflow validate` reports, a run's stage learns from its worker as it starts:
    a ModelSpecError, before any partition comes."""
    from streamflow.ml.worker import EngineSpec, EngineWorker

    settings = EngineSettings(task="regression", target="y", metrics=["MAE"], rolling_window=5,
                              key_field=None, max_models=1, features_topic=TOPIC)
    estimator = change.pop("estimator", [{"linear_model.LinearRegression": {}}])
    spec = EngineSpec(dataclasses.replace(settings, **change), estimator, str(tmp_path), "p", "m", 10)
    worker = EngineWorker(spec, "w", lambda effects: None)
    try:
        with pytest.raises(ModelSpecError) as raised:
            worker.call("start", None)
        assert str(raised.value).startswith(error)
        with pytest.raises(ModelSpecError):  # every request, until closed
            worker.started()
    finally:
        worker.close()
