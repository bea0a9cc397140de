"""The model registry: checkpoints kept as versions with their metadata, retention, tags,
integrity, export, rollback through the worker, and the ``streamflow models`` commands."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from river import datasets, linear_model, preprocessing

import streamflow.ml
from streamflow.cli import main
from streamflow.ml.checkpoint import MAGIC, CheckpointError, CheckpointStore, publish
from streamflow.ml.engine import ModelEngine
from streamflow.ml.host import EngineHost
from streamflow.ml.model import RiverModel
from streamflow.ml.registry import Registry, RegistryError, prepare_version
from streamflow.ml.worker import Effects, EngineSpec, EngineWorker
from tests.model_versions import TOPIC, VersionWriter, batch, settings

STREAM = list(itertools.islice(datasets.TrumpApproval(), 500))


def new_engine(tmp_path: Path) -> ModelEngine:
    store = CheckpointStore(tmp_path, "p", "model")
    eng = ModelEngine(settings(), lambda: RiverModel(
        preprocessing.StandardScaler() | linear_model.LinearRegression(), "regression"), store)
    eng.registry_metadata = {"config_hash": "c0ffee"}
    eng.assign(0)
    return eng


def learn_and_checkpoint(eng: ModelEngine, first: int, count: int, keep: int) -> None:
    """Learn records ``first`` to ``first + count`` of the stream, then checkpoint as the
    worker and the stage do: staged files and the version prepared, then published."""
    chunk = STREAM[first:first + count]
    eng.score(0, list(range(first, first + count)), [None] * count, [x for x, _ in chunk],
              [y for _, y in chunk], [""] * count)
    snapshots = eng.snapshots()
    staged = [snapshot.staged(first, keep) for snapshot in snapshots]
    for snapshot, file in zip(snapshots, staged, strict=True):
        snapshot.write_staged(file)
    prepare_version(snapshots, staged)
    publish(staged)


def test_each_checkpoint_is_a_version_with_its_metadata(tmp_path: Path) -> None:
    eng = new_engine(tmp_path)
    for first in range(0, 300, 100):
        learn_and_checkpoint(eng, first, 100, keep=5)
    registry = Registry.of_stage(tmp_path, "p", "model")
    versions = registry.versions()
    assert [v.number for v in versions] == [1, 2, 3]
    assert [v.records_learned for v in versions] == [100, 200, 300]
    part = versions[-1].metadata["partitions"][f"{TOPIC}+0"]
    assert part["next_offsets"] == {TOPIC: 300}
    assert part["learned"] == {"": 300}
    metric = eng.states[0].metrics[0]
    assert part["metrics"]["MAE"] == {"cumulative": metric.cumulative.get(),
                                      "rolling": metric.rolling_value()}
    assert part["drift_events"] == 0 and part["rollback"] is None
    assert versions[-1].metadata["config_hash"] == "c0ffee"
    assert versions[-1].metadata["version"] == 3
    assert versions[0].metadata["created_at"] <= versions[-1].metadata["created_at"]
    # a version is the file that was current then: later checkpoints replace it, not change it
    _header, (state, models) = registry.load_state(1, f"{TOPIC}+0")
    assert models[""].learned == 100 and state.next_offsets == {TOPIC: 100}
    registry.verify(1)


def test_retention_keeps_the_last_versions_the_tagged_ones_and_a_requested_rollback(
    tmp_path: Path,
) -> None:
    eng = new_engine(tmp_path)
    registry = Registry.of_stage(tmp_path, "p", "model")
    learn_and_checkpoint(eng, 0, 50, keep=2)
    learn_and_checkpoint(eng, 50, 50, keep=2)
    assert registry.tag(1, "good") is None
    learn_and_checkpoint(eng, 100, 50, keep=2)
    registry.request_rollback(2)
    for first in range(150, 300, 50):
        learn_and_checkpoint(eng, first, 50, keep=2)
    assert [v.number for v in registry.versions()] == [1, 2, 5, 6]
    assert registry.version(1).tags == ["good"]
    assert registry.tag(5, "good") == 1  # a tag moves
    assert registry.resolve("good") == 5 and registry.resolve("latest") == 6
    with pytest.raises(RegistryError, match="a tag is a name other than latest"):
        registry.tag(5, "latest")
    registry.request_rollback(6)  # version 2 is no longer pinned, nor 1 tagged
    learn_and_checkpoint(eng, 300, 50, keep=2)
    assert [v.number for v in registry.versions()] == [5, 6, 7]
    assert registry.untag("good") == 5
    with pytest.raises(RegistryError, match=r"no version 2 \(it has 5..7\)"):
        registry.version(2)
    assert sorted(path.name for path in registry.versions_directory.iterdir()) == ["5", "6", "7"]


def test_a_tampered_version_is_refused_before_it_is_unpickled(tmp_path: Path) -> None:
    eng = new_engine(tmp_path)
    learn_and_checkpoint(eng, 0, 100, keep=3)
    registry = Registry.of_stage(tmp_path, "p", "model")
    [path] = registry.files(1).values()
    header = path.read_bytes().split(b"\n", 2)[1]
    marker = tmp_path / "payload-ran"
    path.write_bytes(MAGIC + header + b"\n" + pickle.dumps(MakesADirectory(marker)))
    for read in (registry.verify, lambda n: registry.load_state(n, f"{TOPIC}+0"),
                 lambda n: registry.export(n, tmp_path / "out.pkl"),
                 registry.request_rollback):
        with pytest.raises(CheckpointError, match="does not match the sha256 recorded"):
            read(1)
    assert not marker.exists() and not (tmp_path / "out.pkl").exists()
    assert registry.rollback_request() is None


class MakesADirectory:
    """A payload that, once unpickled, has created the directory it names."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.path),)


def test_an_export_loads_with_streamflow_and_with_plain_pickle(tmp_path: Path) -> None:
    eng = new_engine(tmp_path)
    learn_and_checkpoint(eng, 0, 200, keep=3)
    learn_and_checkpoint(eng, 200, 200, keep=3)
    registry = Registry.of_stage(tmp_path, "p", "model")
    registry.tag(1, "first")
    destination = tmp_path / "model.pkl"
    digest = registry.export(1, destination)
    assert oct(destination.stat().st_mode & 0o777) == "0o600"

    exported = streamflow.ml.load(destination, sha256=digest)
    assert exported.metadata["version"] == 1 and exported.metadata["tags"] == ["first"]
    assert exported.metadata["partitions"][f"{TOPIC}+0"]["next_offsets"] == {TOPIC: 200}
    _header, (_state, models) = registry.load_state(1, f"{TOPIC}+0")
    x = STREAM[450][0]
    expected = models[""].model.estimator.predict_one(x)
    assert exported.model.predict_one(x) == expected
    assert exported.model.predict_one(x) != eng.slot(0, "").model.estimator.predict_one(x)

    with open(destination, "rb") as handle:
        plain = pickle.load(handle)
    assert plain["metadata"] == exported.metadata
    assert plain["models"][0][""].predict_one(x) == expected
    with pytest.raises(CheckpointError, match="does not have the SHA-256 given"):
        streamflow.ml.load(destination, sha256="0" * 64)
    os.chmod(destination, 0o666)
    with pytest.raises(CheckpointError, match="may be written by others"):
        streamflow.ml.load(destination)


def test_a_running_worker_adopts_a_rollback_between_batches_and_a_new_one_at_start(
    tmp_path: Path,
) -> None:
    spec = EngineSpec(settings(), [{"linear_model.LinearRegression": {}}], str(tmp_path), "p",
                      "model", 1000, keep_versions=5, config_hash="c0ffee")
    registry = Registry.of_stage(tmp_path, "p", "model")
    effects: list[Effects] = []
    worker = EngineWorker(spec, "w", effects.append)
    try:
        worker.call("start", None)
        worker.call("assign", [0])
        worker.call("handle", batch(0, 10))
        publish(worker.call("checkpoint").staged)  # version 1: 10 records learned
        worker.call("handle", batch(10, 20))
        publish(worker.call("checkpoint").staged)  # version 2: 30
        publish(worker.call("checkpoint").staged)  # nothing learned since: no version
        assert [v.records_learned for v in registry.versions()] == [10, 30]
        assert registry.version(2).metadata["river_version"]
        registry.request_rollback(1)
        first, deadline = 30, time.monotonic() + 10
        reply = worker.call("handle", batch(first, 5))
        while reply.versions[0] >= 30 and time.monotonic() < deadline:
            time.sleep(0.05)  # the worker looks for a request at most once a second
            first += 5
            reply = worker.call("handle", batch(first, 5))
        assert reply.versions == [10, 11, 12, 13, 14]
        assert reply.checkpoint_due  # the adoption is saved soon
        assert [version for effect in effects for version in effect.rollbacks] == [1]
        assert any("rolled back to version 1" in message
                   for effect in effects for _logger, _level, message in effect.logs)
        publish(worker.call("checkpoint").staged)
        latest = registry.versions()[-1].metadata["partitions"][f"{TOPIC}+0"]
        assert latest["records_learned"] == 15
        assert latest["rollback"]["version"] == 1
        assert latest["rollback"]["from_version"] == 2  # the newest when it was adopted
        assert latest["next_offsets"] == {TOPIC: first + 5}  # offsets go on: nothing relearned
    finally:
        worker.close()

    # adopted and saved: a restart does not adopt it again; a new request, made while the
    # stage is stopped, is adopted when the partition is restored
    worker = EngineWorker(spec, "w2", effects.append)
    try:
        worker.call("start", None)
        worker.call("assign", [0])
        assert worker.call("handle", batch(first + 5, 1)).versions == [15]
        registry.request_rollback(2)
        worker.call("revoke", [0])
        worker.call("assign", [0])
        assert worker.call("handle", batch(first + 6, 1)).versions == [30]
        assert [version for effect in effects for version in effect.rollbacks] == [1, 2]
    finally:
        worker.close()


def test_the_rollback_a_record_was_predicted_after_is_found_by_its_offset(tmp_path: Path) -> None:
    writer = VersionWriter(tmp_path)
    for _ in range(3):
        writer.learn(10)
        writer.checkpoint()  # versions 1-3; the next record is offset 30
    writer.roll_back(1)
    writer.learn(10)
    writer.checkpoint()  # version 4: rollback to 1 at offset 30
    writer.roll_back(3)
    writer.learn(10)
    writer.checkpoint()  # version 5: rollback to 3 at offset 40
    found = [writer.registry.rollback_at(TOPIC, 0, offset) for offset in (29, 30, 39, 40, 99)]
    assert [r and (r["version"], r["from_version"], r["at_offsets"]) for r in found] == [
        None, (1, 3, {TOPIC: 30}), (1, 3, {TOPIC: 30}), (3, 4, {TOPIC: 40}), (3, 4, {TOPIC: 40})]
    assert writer.registry.rollback_at(TOPIC, 1, 99) is None  # another partition
    assert writer.registry.rollback_at("other", 0, 99) is None


def test_the_models_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    eng = new_engine(tmp_path / "checkpoints")
    for first in range(0, 300, 100):
        learn_and_checkpoint(eng, first, 100, keep=5)
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "pipeline": "p",
        "kafka": {"bootstrap": "localhost:9092"},
        "models": [{"name": "model", "input": TOPIC, "output": "scored", "target": "y",
                    "estimator": [{"linear_model.LinearRegression": {}}],
                    "checkpoint": {"path": str(tmp_path / "checkpoints"), "keep_versions": 5}}],
    }))
    file = str(pipeline)
    assert main(["models", "list", file]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["version", "created", "(UTC)"]
    assert [line.split()[0] for line in lines[1:]] == ["1", "2", "3"]
    assert f"{TOPIC}/0:300" in lines[3]
    assert main(["models", "tag", file, "--stage", "model", "2", "keep"]) == 0
    assert "version 2 tagged keep" in capsys.readouterr().out
    assert main(["models", "show", file, "keep"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 2 and shown["tags"] == ["keep"] and shown["integrity"] == "verified"
    assert main(["models", "list", file, "--json"]) == 0
    assert [json.loads(line)["version"] for line in capsys.readouterr().out.splitlines()] == [1, 2, 3]
    assert main(["models", "export", file, "keep", "-o", str(tmp_path / "m.pkl")]) == 0
    assert "sha256 " in capsys.readouterr().out
    assert streamflow.ml.load(tmp_path / "m.pkl").metadata["version"] == 2
    assert main(["models", "rollback", file, "1"]) == 0
    assert "rollback to version 1 requested" in capsys.readouterr().out
    assert main(["models", "list", file]) == 0
    assert "rollback to version 1 requested at" in capsys.readouterr().out
    assert main(["models", "show", file, "9"]) == 1
    assert "has no version 9 (it has 1..3)" in capsys.readouterr().err
    assert main(["models", "list", file, "--stage", "other"]) == 1
    assert "has no model stage 'other'" in capsys.readouterr().err


def test_a_rollback_to_a_version_tampered_since_the_request_leaves_the_model_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    spec = EngineSpec(settings(), [{"linear_model.LinearRegression": {}}], str(tmp_path), "p",
                      "model", 1000, keep_versions=5)
    effects = Effects()
    host = EngineHost(spec, effects)
    host.start(None)
    host.assign([0])
    for first in (0, 10):
        host.handle(batch(first, 10))
        durable = host.checkpoint()
        for snapshot, file in zip(durable.snapshots, durable.reply.staged, strict=True):
            snapshot.write_staged(file)
        prepare_version(durable.snapshots, durable.reply.staged)
        publish(durable.reply.staged)
    registry = Registry.of_stage(tmp_path, "p", "model")
    registry.request_rollback(1)
    [path] = registry.files(1).values()
    data = bytearray(path.read_bytes())
    data[-20] ^= 1
    path.write_bytes(bytes(data))
    with caplog.at_level("ERROR"):
        host.adopt_requested(force=True)
        host.adopt_requested(force=True)
    [failure] = [r.getMessage() for r in caplog.records if "rollback" in r.getMessage()]
    assert "rollback of partition 0 to version 1 failed: CheckpointError" in failure
    assert effects.rollbacks == []
    assert host.handle(batch(20, 1)).versions == [20]  # the model it had goes on
