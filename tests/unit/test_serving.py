"""The model server: POST /predict and GET /healthz, started on a free port, over registry
versions a real engine checkpointed; the features it builds against
the stage's own; its bounds (body size, concurrency, time) and its bearer token off loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import pickle
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from aiohttp import ClientSession
from pydantic import ValidationError
from river import datasets, linear_model, preprocessing

from streamflow.cli import main
from streamflow.config.models import BatchConfig, ModelConfig, ServingConfig
from streamflow.metrics import PipelineMetrics
from streamflow.ml.checkpoint import CheckpointStore, publish
from streamflow.ml.engine import EngineSettings, ModelEngine
from streamflow.ml.features import pickled_feature_rows
from streamflow.ml.model import RiverModel
from streamflow.ml.registry import prepare_version
from streamflow.ml.worker import BatchRequest, EngineSpec
from streamflow.runtime.model_stage import ModelStage
from streamflow.runtime.serving import (
    ModelServer,
    Predictor,
    RequestError,
    ServingError,
    load_version,
    split_body,
)
from streamflow.runtime.stages import StageIdentity
from streamflow.transport import ConsumedBatch
from streamflow.transport.memory import MemoryTransport
from tests.hostile import generate
from tests.unit.test_features import same_rows

TOPIC = "features"
STREAM = list(itertools.islice(datasets.TrumpApproval(), 300))
FEATURES = sorted(STREAM[0][0])
TOKEN = "s3cret-token-of-32-characters-ok"


def model_config(tmp_path: Path, **settings: Any) -> ModelConfig:
    return ModelConfig.model_validate({
        "name": "model", "input": TOPIC, "output": "scored", "target": "y",
        "estimator": [{"preprocessing.StandardScaler": {}}, {"linear_model.LinearRegression": {}}],
        "checkpoint": {"path": str(tmp_path)}, **settings})


class Trainer:
    """A real engine on a checkpoint store, checkpointing as the worker and stage do."""

    def __init__(self, tmp_path: Path, key_field: str | None = None,
                 task: str = "regression", estimator: Callable[[], Any] | None = None,
                 challengers: dict[str, Callable[[], Any]] | None = None) -> None:
        settings = EngineSettings(task=task, target="y", metrics=[], rolling_window=10,
                                  key_field=key_field, max_models=10, features_topic=TOPIC,
                                  challengers=tuple(challengers or ()))
        build = estimator or (lambda: preprocessing.StandardScaler()
                              | linear_model.LinearRegression())
        self.engine = ModelEngine(
            settings, lambda: RiverModel(build(), task), CheckpointStore(tmp_path, "p", "model"),
            new_challengers={name: lambda make=make: RiverModel(make(), task)
                             for name, make in (challengers or {}).items()} or None)
        self.offset = 0

    def learn(self, records: list[tuple[dict[str, Any], Any]], partition: int = 0,
              keys: list[str] | None = None) -> None:
        if partition not in self.engine.states:
            self.engine.assign(partition)
        count = len(records)
        self.engine.score(partition, list(range(self.offset, self.offset + count)), [None] * count,
                          [x for x, _ in records], [y for _, y in records], keys or [""] * count)
        self.offset += count

    def checkpoint(self) -> None:
        snapshots = self.engine.snapshots()
        staged = [snapshot.staged(self.offset, 5) for snapshot in snapshots]
        for snapshot, file in zip(snapshots, staged, strict=True):
            snapshot.write_staged(file)
        prepare_version(snapshots, staged)
        publish(staged)


def fast(**settings: Any) -> ServingConfig:
    return ServingConfig.model_validate({"port": 0, "poll_interval_s": 0.05, **settings})


Call = Callable[..., Awaitable[tuple[int, Any]]]


def serve(server: ModelServer, test: Callable[[Call], Awaitable[None]]) -> None:
    """Run ``test`` against ``server``, started on a free port, with an aiohttp client."""
    server.start()
    try:
        async def run() -> None:
            async with ClientSession() as session:
                async def call(method: str, path: str, **options: Any) -> tuple[int, Any]:
                    async with session.request(method, server.url + path, **options) as response:
                        text = await response.text()
                        if response.content_type == "application/x-ndjson":
                            return response.status, [json.loads(line)
                                                     for line in text.splitlines()]
                        return response.status, json.loads(text)

                await test(call)

        asyncio.run(run())
    finally:
        server.stop()


def body(records: list[dict[str, Any]]) -> bytes:
    return b"\n".join(json.dumps(record).encode() for record in records)


@pytest.fixture
def trained(tmp_path: Path) -> Iterator[tuple[Trainer, ModelServer]]:
    trainer = Trainer(tmp_path)
    trainer.learn(STREAM[:200])
    trainer.checkpoint()
    server = ModelServer("p", model_config(tmp_path, features=FEATURES), fast())
    server.refresh()
    yield trainer, server


def test_one_record_or_ndjson_is_predicted_by_the_newest_version(
    trained: tuple[Trainer, ModelServer]
) -> None:
    _trainer, server = trained
    river = preprocessing.StandardScaler() | linear_model.LinearRegression()
    for x, y in STREAM[:200]:
        river.learn_one(x, y)
    x = STREAM[250][0]

    def served_model() -> Any:
        assert server.served is not None
        return server.served.models[""][1].model.estimator

    before = pickle.dumps(served_model())

    async def test(call: Call) -> None:
        status, answer = await call("POST", "/predict", data=json.dumps(x))
        assert status == 200
        assert answer == {"prediction": pytest.approx(river.predict_one(x), abs=1e-9),
                          "version": 1, "records_learned": 200, "partition": 0}
        status, answers = await call("POST", "/predict", data=body([r for r, _ in STREAM[250:253]]),
                                     headers={"Content-Type": "application/x-ndjson"})
        assert status == 200
        assert [a["prediction"] for a in answers] == [
            pytest.approx(river.predict_one(r), abs=1e-9) for r, _ in STREAM[250:253]]
        # pretty-printed, one record; \r\n between NDJSON lines
        assert (await call("POST", "/predict", data=json.dumps(x, indent=2)))[1]["version"] == 1
        status, answers = await call("POST", "/predict", data=body([x, x]).replace(b"\n", b"\r\n"))
        assert status == 200 and len(answers) == 2
        assert await call("GET", "/healthz") == (200, {
            "stage": "model", "version": 1, "models": 1,
            "loaded_at": server.served.loaded_at if server.served else None})
        # the server learns nothing: the same record, the same answer, the same model
        assert (await call("POST", "/predict", data=json.dumps(x)))[1] == answer
        assert pickle.dumps(served_model()) == before

    serve(server, test)


def test_a_newer_version_replaces_the_served_one_while_serving(
    trained: tuple[Trainer, ModelServer]
) -> None:
    trainer, server = trained
    x = STREAM[250][0]

    async def test(call: Call) -> None:
        before = (await call("POST", "/predict", data=json.dumps(x)))[1]
        trainer.learn(STREAM[200:240])
        trainer.checkpoint()
        deadline = time.monotonic() + 10
        while (await call("GET", "/healthz"))[1]["version"] != 2:
            assert time.monotonic() < deadline, "version 2 was not picked up"
            await asyncio.sleep(0.02)
        after = (await call("POST", "/predict", data=json.dumps(x)))[1]
        assert (after["version"], after["records_learned"]) == (2, 240)
        assert after["prediction"] != before["prediction"]

    serve(server, test)


def test_a_version_that_fails_its_integrity_check_is_not_served(
    trained: tuple[Trainer, ModelServer]
) -> None:
    trainer, server = trained
    trainer.learn(STREAM[200:240])
    trainer.checkpoint()
    [path] = server.registry.files(2).values()
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not server.refresh()
    assert server.served is not None and server.served.number == 1
    trainer.learn(STREAM[240:260])
    trainer.checkpoint()
    assert server.refresh() and server.served.number == 3


def test_bad_input_is_a_4xx_in_json_naming_the_records(
    trained: tuple[Trainer, ModelServer]
) -> None:
    _trainer, server = trained
    x = STREAM[0][0]

    async def test(call: Call) -> None:
        status, answer = await call("POST", "/predict", data=body([x, {"a": 1}]).replace(
            b'{"a"', b'{"a" oops'))
        assert status == 400
        assert [r["record"] for r in answer["records"]] == [1]
        assert "invalid JSON" in answer["records"][0]["error"]
        assert (await call("POST", "/predict", data=b"[1, 2]"))[0] == 400
        assert (await call("POST", "/predict", data=b"  \n"))[1] == {
            "error": "the body is empty: send a JSON object, or NDJSON lines"}
        assert (await call("POST", "/predict", data=b"\xff\xfe{}"))[0] == 400
        status, answer = await call("POST", "/predict", data=json.dumps(
            {k: v for k, v in x.items() if k != "ordinal_date"}))
        assert (status, answer) == (422, {"error": "feature fields missing: ordinal_date"})
        # a type the estimator refuses: the record's error, as the stage's dead letter has it
        status, answer = await call("POST", "/predict", data=body(
            [{**x, "gallup": "high"}, {**x, "gallup": "low"}, x | {"gallup": None}]))
        assert status == 422
        assert [r["record"] for r in answer["records"]] == [0, 1]
        assert answer["records"][0]["error"].startswith("TypeError: ")
        status, answer = await call("POST", "/predict", data=json.dumps({**x, "gallup": [1, 2]}))
        assert status == 422 and answer["records"][0]["error"].startswith("TypeError: ")
        # types that conflict between the records of one body: as in a stage's batch, the
        # records that do not fit the others are not decoded
        status, answer = await call("POST", "/predict", data=body(
            [x, {**x, "gallup": "high"}, {**x, "gallup": None}]))
        assert status == 400
        assert answer["records"] == [{"record": 1, "error": "field types conflict: Unable to "
                                      "merge: Field gallup has incompatible types: double vs string"}]
        status, answer = await call("GET", "/predict")
        assert status == 405 and "error" in answer
        status, answer = await call("POST", "/elsewhere", data=b"{}")
        assert status == 404 and "error" in answer

    serve(server, test)


@pytest.mark.parametrize("features", [None, ["id", "v"]])
def test_hostile_records_get_an_answer_or_a_4xx_never_an_error(
    trained: tuple[Trainer, ModelServer], features: list[str] | None
) -> None:
    _trainer, server = trained
    predictor = Predictor(model_config(Path(server.registry.store), features=features))
    assert server.served is not None
    values = [record.value for record in generate(250, seed=29, huge_every=125)
              if record.value is not None]
    bodies = values + [b"\n".join(values[i:i + 7]) for i in range(0, len(values), 7)]
    outcomes: Counter[int] = Counter()
    for request in bodies:
        try:
            answers, _ndjson = predictor.predict(request, server.served)
            outcomes[200] += 1
            json.dumps(answers, allow_nan=False)  # what the server sends is JSON
        except RequestError as exc:
            assert 400 <= exc.status < 500
            outcomes[exc.status] += 1
    assert outcomes[200] and outcomes[400]  # answers and refusals both


def test_a_body_over_max_body_bytes_is_refused_with_413(tmp_path: Path) -> None:
    trainer = Trainer(tmp_path)
    trainer.learn(STREAM[:50])
    trainer.checkpoint()
    server = ModelServer("p", model_config(tmp_path), fast(max_body_bytes=1000))
    server.refresh()
    large = body([STREAM[0][0]] * 20)
    assert len(large) > 1000

    async def test(call: Call) -> None:
        status, answer = await call("POST", "/predict", data=large)
        assert status == 413 and "exceeds 1000" in answer["error"]

        async def chunked() -> Any:
            yield large  # no Content-Length: aiohttp stops reading at the bound
        status, answer = await call("POST", "/predict", data=chunked())
        assert status == 413 and "error" in answer

    serve(server, test)


def test_no_version_yet_is_503_until_one_appears(tmp_path: Path) -> None:
    server = ModelServer("p", model_config(tmp_path), fast())
    assert not server.refresh()

    async def test(call: Call) -> None:
        assert (await call("GET", "/healthz"))[0] == 503
        status, answer = await call("POST", "/predict", data=json.dumps(STREAM[0][0]))
        assert status == 503 and "no model version yet" in answer["error"]
        trainer = Trainer(tmp_path)
        trainer.learn(STREAM[:50])
        trainer.checkpoint()
        deadline = time.monotonic() + 10
        while (await call("GET", "/healthz"))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert (await call("POST", "/predict", data=json.dumps(STREAM[0][0])))[0] == 200

    serve(server, test)


def test_keyed_models_are_picked_by_the_records_key(tmp_path: Path) -> None:
    trainer = Trainer(tmp_path, key_field="device")
    trainer.learn([({"x": float(i % 7)}, 2.0 * (i % 7)) for i in range(300)], partition=0,
                  keys=["a"] * 300)
    trainer.learn([({"x": float(i % 7)}, -3.0 * (i % 7)) for i in range(300)], partition=1,
                  keys=["b"] * 300)
    trainer.checkpoint()
    server = ModelServer("p", model_config(tmp_path, features=["x"], key_field="device"), fast())
    server.refresh()
    served = load_version(server.registry, 1)
    expected = {key: slot.model.predict({"x": 5.0}).value
                for key, (_partition, slot) in served.models.items()}

    async def test(call: Call) -> None:
        status, answers = await call("POST", "/predict", data=body(
            [{"device": "a", "x": 5.0}, {"device": "b", "x": 5.0, "other": "ignored"}]))
        assert status == 200
        assert [(a["key"], a["partition"], a["prediction"]) for a in answers] == [
            ("a", 0, expected["a"]), ("b", 1, expected["b"])]
        assert expected["a"] > 5 and expected["b"] < -5  # each key's own model
        status, answer = await call("POST", "/predict", data=body(
            [{"device": "a", "x": 1.0}, {"device": "zz", "x": 1.0}]))
        assert status == 422
        assert answer["records"] == [{"record": 1,
                                      "error": "version 1 has no model for device 'zz'"}]

    serve(server, test)


def test_with_challengers_the_champion_answers_and_is_named(tmp_path: Path) -> None:
    trainer = Trainer(tmp_path, challengers={"plain": linear_model.LinearRegression})
    trainer.learn(STREAM[:200])
    trainer.checkpoint()
    config = model_config(tmp_path, challengers=[
        {"name": "plain", "estimator": [{"linear_model.LinearRegression": {}}]}])
    server = ModelServer("p", config, fast())
    server.refresh()
    assert server.served is not None
    _partition, slot = server.served.models[""]
    assert slot.challengers is not None and set(slot.challengers) == {"plain"}
    x = STREAM[250][0]
    [answer], _ndjson = server.predictor.predict(json.dumps(x).encode(), server.served)
    assert answer["champion"] == "main"
    assert answer["prediction"] == slot.model.predict(x).value
    assert answer["prediction"] != slot.challengers["plain"].model.predict(x).value


def test_a_classifier_answers_its_class_probabilities(tmp_path: Path) -> None:
    phishing = list(itertools.islice(datasets.Phishing(), 300))
    trainer = Trainer(tmp_path, task="classification", estimator=lambda: (
        preprocessing.StandardScaler() | linear_model.LogisticRegression()))
    trainer.learn(phishing)
    trainer.checkpoint()
    config = ModelConfig.model_validate({
        "name": "model", "input": TOPIC, "output": "scored", "target": "y",
        "estimator": [{"linear_model.LogisticRegression": {}}], "prediction_field": "phishing",
        "checkpoint": {"path": str(tmp_path)}})
    server = ModelServer("p", config, fast())
    server.refresh()
    x = phishing[-1][0]

    async def test(call: Call) -> None:
        status, answer = await call("POST", "/predict", data=json.dumps(x))
        assert status == 200
        assert isinstance(answer["phishing"], bool)
        assert set(answer["probabilities"]) == {"True", "False"}
        assert sum(answer["probabilities"].values()) == pytest.approx(1)

    serve(server, test)


def stage_request(config: ModelConfig, values: list[bytes]) -> BatchRequest:
    """What a model stage hands its worker for one batch of ``values``."""
    metrics = PipelineMetrics("p")
    stage = ModelStage(StageIdentity("p", "model", TOPIC, "dlq"), MemoryTransport("equality"),
                       BatchConfig(),
                       metrics.stage("model", ("model",)), partial(metrics.model, "model"), config,
                       EngineSpec(EngineSettings("regression", "y", [], 10, None, 1, TOPIC),
                                  config.estimator, "", "p", "model", 1), None)
    count = len(values)
    request, _in_flight = stage._prepare(ConsumedBatch(
        [TOPIC] * count, [0] * count, list(range(count)), [None] * count, list(values),
        [0] * count, [None] * count))
    return request


def stage_features(config: ModelConfig, values: list[bytes]) -> list[dict[str, Any]] | None:
    """The feature dicts of :func:`stage_request` (None when the stage dead-letters the batch)."""
    request = stage_request(config, values)
    if request.features is None:
        return None
    assert isinstance(request.features, pa.Table)  # sent to the worker as its rows' pickle
    features: list[dict[str, Any]] = pickle.loads(pickled_feature_rows(request.features))
    return features


EQUALITY_BODIES = [
    # one record: integers stay integers, a bool or a string is not a feature unless listed
    [{"a": 1, "b": 2.5, "flag": True, "name": "x", "y": 3.0}],
    # several: an integer column with a float in it becomes floats, as in a stage's batch
    [{"a": 1, "b": 2}, {"a": 2.5, "b": 3, "extra": {"nested": 1}}, {"b": 4, "y": None}],
    # missing values and nulls are left out of the dicts
    [{"a": None, "b": 1.0}, {"b": 2.0}, {"a": 7, "b": 3.0, "c": 1e300}],
    # field names the runtime escapes, unicode, large integers
    [{"_sf_row": 5, "é": 1.5, "big": 2**53 + 1}],
]


@pytest.mark.parametrize("records", EQUALITY_BODIES)
@pytest.mark.parametrize("features", [None, ["a", "b"]])
def test_the_servers_feature_dicts_equal_the_stages(
    tmp_path: Path, records: list[dict[str, Any]], features: list[str] | None
) -> None:
    config = model_config(tmp_path, features=features)
    values = [json.dumps(record).encode() for record in records]
    server = ModelServer("p", config, fast())
    stage = stage_features(config, values)
    if stage is None:  # a listed feature in no record: the stage dead-letters the batch
        with pytest.raises(RequestError, match="feature fields missing: a, b") as refused:
            server.predictor.records(split_body(b"\n".join(values))[0])
        assert refused.value.status == 422
        return
    served = server.predictor.records(split_body(b"\n".join(values))[0])
    assert stage and same_rows(served.features, stage)


def test_the_servers_model_keys_equal_the_stages(tmp_path: Path) -> None:
    config = model_config(tmp_path, features=["x"], key_field="device")
    records = [{"device": "a", "x": 1}, {"device": "b7", "x": 2}, {"device": None, "x": 3},
               {"x": 4}]
    values = [json.dumps(record).encode() for record in records]
    served = Predictor(config).records(values)
    assert served.keys == stage_request(config, values).model_keys == ["a", "b7", "None", "None"]
    alone = [json.dumps({"x": 1}).encode()]  # no record of the batch has the field
    assert Predictor(config).records(alone).keys == [""]
    assert stage_request(config, alone).model_keys is None  # the worker takes "" for each


def test_off_loopback_a_token_is_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="set token_env"):
        ServingConfig.model_validate({"host": "0.0.0.0"})
    settings = fast(host="0.0.0.0", token_env="SERVE_TOKEN")
    with pytest.raises(ServingError, match="needs a bearer token in SERVE_TOKEN, which is not set"):
        ModelServer("p", model_config(tmp_path), settings, environ={})
    with pytest.raises(ServingError, match="shorter than 16 characters; set SERVE_TOKEN"):
        ModelServer("p", model_config(tmp_path), settings, environ={"SERVE_TOKEN": "short"})

    trainer = Trainer(tmp_path)
    trainer.learn(STREAM[:50])
    trainer.checkpoint()
    monkeypatch.setenv("SERVE_TOKEN", TOKEN)
    server = ModelServer("p", model_config(tmp_path), settings).start()
    try:
        url = f"http://127.0.0.1:{server.port}"

        async def run() -> list[tuple[int, dict[str, Any]]]:
            answers = []
            async with ClientSession() as session:
                for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"},
                                {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}"}):
                    for method, path in (("POST", "/predict"), ("GET", "/healthz")):
                        async with session.request(method, url + path, headers=headers,
                                                   data=json.dumps(STREAM[0][0])) as response:
                            answers.append((response.status, await response.json()))
            return answers

        answers = asyncio.run(run())
        assert [status for status, _ in answers] == [401] * 6 + [200, 200]
        assert answers[0][1] == {"error": "missing or wrong bearer token"}
        assert answers[6][1]["version"] == 1
    finally:
        server.stop()


def raw_request(port: int, head: bytes) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.sendall(head)
    return connection


def status_of(connection: socket.socket) -> int:
    answer = connection.recv(4096)
    connection.close()
    return int(answer.split(b" ", 2)[1])


def test_concurrent_requests_are_bounded_and_a_slow_body_times_out(tmp_path: Path) -> None:
    trainer = Trainer(tmp_path)
    trainer.learn(STREAM[:50])
    trainer.checkpoint()
    server = ModelServer("p", model_config(tmp_path),
                         fast(max_connections=1, request_timeout_s=1.0)).start()
    try:
        head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        slow = raw_request(server.port or 0, head)  # its body never completes
        time.sleep(0.3)
        refused = raw_request(server.port or 0, head.replace(b"100", b"2") + b"}")
        assert status_of(refused) == 503
        started = time.monotonic()
        assert status_of(slow) == 408
        assert 0.5 < time.monotonic() - started < 5
        record = json.dumps(STREAM[0][0]).encode()
        ok = raw_request(server.port or 0, b"POST /predict HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(record), record))
        assert status_of(ok) == 200
    finally:
        server.stop()


def test_a_connection_whose_headers_trickle_in_is_closed(tmp_path: Path) -> None:
    server = ModelServer("p", model_config(tmp_path), fast(keepalive_timeout_s=0.5)).start()
    try:
        connection = raw_request(server.port or 0, b"POST /predict HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for byte in b"X-Slow: " + b"a" * 40:
                connection.sendall(bytes([byte]))
                time.sleep(0.1)
        assert connection.recv(100) == b""  # closed by the server, without an answer
        assert time.monotonic() - started < 3
        connection.close()
    finally:
        server.stop()


def test_a_taken_port_is_a_serving_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ServingError, match=f"cannot listen on 127.0.0.1:{port}"):
            ModelServer("p", model_config(tmp_path), fast(port=port)).start()


def test_serve_refuses_an_unknown_stage_and_a_host_off_loopback_without_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps({"pipeline": "p", "models": [model_config(tmp_path).model_dump(
        mode="json", exclude_none=True)]}))
    assert main(["serve", str(path), "--stage", "nope"]) == 2
    assert "has no model stage 'nope'" in capsys.readouterr().err
    assert main(["serve", str(path), "--host", "0.0.0.0"]) == 2
    assert "set token_env" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", str(path), "--port", str(taken.getsockname()[1])]) == 1
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
