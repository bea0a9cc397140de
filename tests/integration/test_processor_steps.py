"""A processor stage of several library steps on a real broker: records routed per topic, bad
ones dead-lettered with headers, counters reconciled."""

from __future__ import annotations

import json

from streamflow.config import parse_pipeline
from streamflow.runtime.pipeline import PipelineRunner
from streamflow.transport import OutgoingBatch, TopicSpec, create_transport
from tests.helpers import read_topic

RECORDS = [
    b'{"id": " A1 ", "t": "35.5", "site": "paris"}',   # hot
    b'{"id": "b2", "t": 12}',                          # normal (rest)
    b'{"id": "b2", "t": 13}',                          # repeat of b2: filtered by dedupe
    b'{"id": "c3", "t": -80}',                         # breaks validate min
    b"not json",                                       # parse failure
    b'{"id": "d4", "t": 1, "site": "skip"}',           # filtered by filter
    b'{"id": "e5", "t": 31}',                          # hot
    b'{"t": 20}',                                      # missing required id
]


def test_library_steps_route_dead_letter_and_reconcile(fresh_broker: str) -> None:
    config = parse_pipeline({
        "pipeline": "lib",
        "kafka": {"bootstrap": fresh_broker},
        "topics": [{"name": name, "partitions": 1} for name in ("raw", "rest", "hot", "lib.dlq")],
        "processors": [{"name": "clean", "input": "raw", "output": "rest", "steps": [
            {"parse": {"format": "json"}},
            {"schema": {"id": {"type": "string", "required": True}, "t": {"type": "float"},
                        "site": {"type": "string", "default": "unknown"}}},
            {"normalize": {"id": ["trim", "lower"]}},
            {"validate": {"t": {"min": -50, "max": 60}}},
            {"filter": "site <> 'skip'"},
            {"dedupe": {"key": "id", "window_s": 60}},
            {"route": {"routes": [{"when": "t > 30", "topic": "hot"}]}},
        ]}],
        "metrics": {"port": 0},
    })
    transport = create_transport("confluent", fresh_broker)
    admin = transport.admin()
    admin.create_topics([TopicSpec("raw", 1)])
    admin.close()
    producer = transport.producer()
    producer.produce([OutgoingBatch("raw", RECORDS, keys=[str(i).encode() for i in range(len(RECORDS))])])
    producer.close()

    runner = PipelineRunner(config, until_idle_s=1, metrics_port=0)
    result = runner.run()

    assert result.exit_code == 0, result.errors
    hot = read_topic(fresh_broker, "hot")
    rest = read_topic(fresh_broker, "rest")
    assert [json.loads(v) for v in hot.values] == [
        {"id": "a1", "t": 35.5, "site": "paris"}, {"id": "e5", "t": 31.0, "site": "unknown"}]
    assert hot.keys == [b"0", b"6"]
    assert [json.loads(v) for v in rest.values] == [{"id": "b2", "t": 12.0, "site": "unknown"}]
    dead = read_topic(fresh_broker, "lib.dlq")
    headers = {bytes(dict(h or [])["streamflow.original.offset"]).decode(): dict(h or [])
               for h in dead.headers}
    assert sorted(headers, key=int) == ["3", "4", "7"]
    assert headers["3"]["streamflow.step"] == b"validate"
    assert headers["4"]["streamflow.step"] == b"parse"
    assert headers["4"]["streamflow.error.class"] == b"DecodeError"
    assert headers["7"]["streamflow.error.class"] == b"SchemaViolation"
    assert headers["7"]["streamflow.stage"] == b"clean"
    assert b"not json" in dead.values

    counts = {}
    for family in runner.metrics.registry.collect():
        for sample in family.samples:
            if sample.name.startswith("streamflow_records_") and sample.labels.get("stage") == "clean":
                counts[sample.name.removeprefix("streamflow_records_").removesuffix("_total")] = sample.value
    assert counts["in"] == len(RECORDS)
    assert (counts["out"], counts["filtered"], counts["dead_lettered"]) == (3, 2, 3)
    assert counts["in"] == counts["out"] + counts["filtered"] + counts["dead_lettered"]
