"""Registry versions of a keyed model stage whose keys outnumber ``max_models``: a version holds
every key's model, those evicted from memory to files of their own included; export, rollback
and retention treat them as the rest of the version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import streamflow.ml
from streamflow.ml.checkpoint import CheckpointError, CheckpointStore, model_name, publish
from streamflow.ml.features import pickled_feature_rows
from streamflow.ml.pool import EngineWorkers
from streamflow.ml.registry import Registry, prepare_version
from streamflow.ml.worker import BatchReply, BatchRequest, EngineSpec
from streamflow.runtime.serving import load_version
from tests.model_versions import TOPIC, VersionWriter, settings

KEYS = ["a", "b", "c", "d", "e"]
STATE = f"{TOPIC}+0"
PROBE = {"x": 3.0}


def keyed(first: int, keys: list[str], partitions: list[int] | None = None,
          table: bool = False) -> BatchRequest:
    """One record per key of ``keys``, at offsets from ``first`` (of partition 0 unless
    ``partitions`` says): x = offset % 7 + 1, y = x times the key's rank (1 for a)."""
    offsets = np.arange(first, first + len(keys))
    x = (offsets % 7 + 1).astype(float)
    features = pa.table({"x": x})
    return BatchRequest(
        features=features if table else pickled_feature_rows(features),
        partitions=np.array(partitions or [0] * len(keys), dtype=np.int64), offsets=offsets,
        targets=[float(value) * (ord(key[0]) - ord("a") + 1)
                 for value, key in zip(x.tolist(), keys, strict=True)],
        model_keys=keys)


class KeyedWriter(VersionWriter):
    """A keyed stage of at most two models in memory, on partition 0."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, engine_settings=settings(key_field="k", max_models=2))

    def learn_keys(self, keys: list[str]) -> BatchReply:
        reply = self.host.handle(keyed(self.next_offset, keys))
        self.next_offset += len(keys)
        return reply


def predictions(exported: streamflow.ml.Exported) -> dict[str, float]:
    return {key: model.predict_one(PROBE) for key, model in exported.models[0].items()}


def test_a_version_holds_every_keyed_model_and_keeps_it_when_the_store_moves_on(
    tmp_path: Path,
) -> None:
    writer = KeyedWriter(tmp_path)
    writer.learn_keys(KEYS * 4)
    writer.checkpoint()  # version 1: d and e in memory, a, b and c evicted
    registry = writer.registry
    part = registry.version(1).metadata["partitions"][STATE]
    assert part["learned"] == dict.fromkeys(KEYS, 4)
    assert part["records_learned"] == 20
    store = CheckpointStore(tmp_path, "p", "model")
    assert part["evicted"] == {key: store.path(model_name(STATE, key)).name for key in "abc"}
    version_files = {path.name for path in (registry.versions_directory / "1").iterdir()}
    for file in part["evicted"].values():
        assert {file, f"{file}.digest"} <= version_files
    registry.verify(1)
    first = predictions(streamflow.ml.load(_export(registry, 1, tmp_path)))
    assert sorted(first) == KEYS and len(set(first.values())) == len(KEYS)
    served = load_version(registry, 1)  # the model server answers for the evicted keys too
    assert {key: served.models[key][1].model.estimator.predict_one(PROBE) for key in KEYS} == first

    writer.learn_keys(KEYS * 2)  # each evicted model is read back, learns, and is evicted again
    writer.checkpoint()  # version 2
    assert registry.version(2).metadata["partitions"][STATE]["learned"] == dict.fromkeys(KEYS, 6)
    assert predictions(streamflow.ml.load(_export(registry, 1, tmp_path))) == first
    later = predictions(streamflow.ml.load(_export(registry, 2, tmp_path)))
    assert all(later[key] != first[key] for key in KEYS)

    assert registry.retain(1) == [1]  # the version goes with its links; the store's stay
    assert sorted(path.name for path in registry.versions_directory.iterdir()) == ["2"]
    assert writer.learn_keys(KEYS).versions == [6] * len(KEYS)

    file = registry.versions_directory / "2" / part["evicted"]["a"]
    data = bytearray(file.read_bytes())
    data[-10] ^= 1
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256 recorded"):
        registry.verify(2)


def _export(registry: Registry, number: int, directory: Path) -> Path:
    destination = directory / f"export-{number}.pkl"
    registry.export(number, destination)
    return destination


def test_a_rollback_makes_the_versions_evicted_models_the_stages(tmp_path: Path) -> None:
    writer = KeyedWriter(tmp_path)
    writer.learn_keys(KEYS * 4)
    writer.checkpoint()  # version 1: a, b and c evicted, d and e in memory
    exported = streamflow.ml.load(_export(writer.registry, 1, tmp_path))
    writer.learn_keys([*KEYS, "f"] * 3)  # f is new since version 1
    writer.checkpoint()
    writer.roll_back(1)

    probe = writer.next_offset + (-writer.next_offset % 7) + 2  # an offset whose x is 3
    writer.next_offset = probe
    for key in [*KEYS, "f"]:
        request = keyed(probe, [key])
        request.offsets = np.array([writer.next_offset])
        reply = writer.host.handle(request)
        writer.next_offset += 1
        if key == "f":  # unknown to version 1: a new model
            assert reply.versions == [0] and reply.predictions.values == [0.0]
        else:  # version 1's model, in memory then or evicted
            assert reply.versions == [4]
            assert reply.predictions.values == [exported.models[0][key].predict_one(PROBE)]

    writer.checkpoint()  # version 3: the adopted models, each having learned one more record
    part = writer.registry.version(3).metadata["partitions"][STATE]
    assert part["rollback"]["version"] == 1
    assert part["learned"] == {**dict.fromkeys(KEYS, 5), "f": 1}
    assert sorted(streamflow.ml.load(_export(writer.registry, 3, tmp_path)).models[0]) == [
        *KEYS, "f"]


def test_a_model_evicted_again_while_its_version_is_prepared_stays_as_it_was(
    tmp_path: Path,
) -> None:
    writer = KeyedWriter(tmp_path)
    writer.learn_keys(KEYS * 4)
    durable = writer.host.checkpoint()  # a, b and c evicted; their files linked later
    assert durable.snapshots[0].evicted == dict.fromkeys("abc", 4)
    writer.learn_keys(["a", "d", "e", "b", "d", "e"])  # a and b read back and evicted again
    store = writer.host.engine.store
    assert store.load(model_name(STATE, "a"), "model")[1].learned == 5
    for snapshot, file in zip(durable.snapshots, durable.reply.staged, strict=True):
        snapshot.write_staged(file)
    prepare_version(durable.snapshots, durable.reply.staged)
    assert publish(durable.reply.staged) == [1]

    writer.registry.verify(1)
    evicted = writer.registry.evicted_models(1, STATE)
    assert {key: writer.registry.load_model(1, path)[1].learned
            for key, (path, _learned) in evicted.items()} == dict.fromkeys("abc", 4)


def test_workers_each_prepare_their_partitions_evicted_models_into_one_version(
    tmp_path: Path,
) -> None:
    spec = EngineSpec(settings(key_field="k", max_models=2),
                      [{"linear_model.LinearRegression": {}}], str(tmp_path), "p", "model",
                      10_000, keep_versions=5)
    workers = EngineWorkers(spec, "model", lambda effects: None, 2)
    try:
        workers.call("start", None)
        workers.call("assign", [0, 1])
        keys = KEYS * 4
        request = keyed(0, keys, partitions=[0, 1] * 10, table=True)
        request.offsets = np.arange(len(keys)) // 2  # each partition's offsets rising
        workers.call("handle", request)
        workers.submit("checkpoint")
        assert publish(workers.receive().staged) == [1]
    finally:
        workers.close()
    registry = Registry.of_stage(tmp_path, "p", "model")
    registry.verify(1)
    partitions = registry.version(1).metadata["partitions"]
    learned = {name: sum(part["learned"].values()) for name, part in partitions.items()}
    assert learned == {f"{TOPIC}+0": 10, f"{TOPIC}+1": 10}
    assert all(len(part["evicted"]) == 3 for part in partitions.values())
    exported = streamflow.ml.load(_export(registry, 1, tmp_path))
    assert {partition: sorted(models) for partition, models in exported.models.items()} == {
        0: KEYS, 1: KEYS}
