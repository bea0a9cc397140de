"""Dead-letter tools on the in-memory transport: the --where grammar, reading and selecting dead
letters, replaying their originals, and the --dlq-file copy of a run's dead letters."""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streamflow.config import parse_pipeline
from streamflow.runtime.dead_letters import Failure, dead_letter_batch
from streamflow.runtime.dlq import (
    Condition,
    DeadLetterFile,
    DeadLetterToolError,
    dead_letter_topics,
    document,
    parse_where,
    printable,
    read_letters,
    replay_letters,
    write_letters,
)
from streamflow.transport import ConsumedBatch, OutgoingBatch, TopicSpec, Transport, create_transport
from streamflow.transport.memory import drop_cluster

DLQ = "p.dlq"


@pytest.fixture
def transport() -> Iterator[Transport]:
    name = f"memory://dlq-{uuid.uuid4().hex[:10]}"
    transport = create_transport("memory", name)
    admin = transport.admin()
    admin.create_topics([TopicSpec(DLQ, 2), TopicSpec("raw", 1), TopicSpec("again", 1)])
    admin.close()
    yield transport
    drop_cluster(name)


def consumed(values: list[bytes], headers: list[list[tuple[str, bytes]] | None]) -> ConsumedBatch:
    count = len(values)
    return ConsumedBatch(["raw"] * count, [0] * count, list(range(10, 10 + count)),
                         [b"k%d" % i for i in range(count)], list(values),
                         [1_700_000_000_000 + i for i in range(count)], headers)


def dead_letter(transport: Transport, stage: str, errors: list[BaseException],
                values: list[bytes], headers: list[list[tuple[str, bytes]] | None]) -> None:
    batch = consumed(values, headers)
    failures = [Failure(row, "parse", error) for row, error in enumerate(errors)]
    producer = transport.producer()
    producer.produce([dead_letter_batch(DLQ, "p", stage, failures, batch)])
    producer.close()


def test_where_is_a_small_grammar_of_header_comparisons_joined_by_and() -> None:
    assert parse_where("error.class = 'SchemaViolation' and streamflow.stage != \"clean\" "
                       "AND step='it''s'") == [
        Condition("streamflow.error.class", "SchemaViolation", False),
        Condition("streamflow.stage", "clean", True),
        Condition("streamflow.step", "it's", False),
    ]
    for text, says in [
        ("", "at the end"),
        ("error.class = SchemaViolation", "values in quotes"),
        ("stage = 'a' or step = 'b'", "joined by 'and', not 'or'"),
        ("stage = 'a' and", "at the end"),
        ("stage == 'a'", "expected NAME = 'value'"),
        ("error.clas = 'x'", "did you mean 'error.class'?"),
        ("__import__('os').system('true')", "cannot read"),
        ("stage = 'a' ; drop table x", "cannot read"),
    ]:
        with pytest.raises(DeadLetterToolError, match=says.replace("?", r"\?").replace("(", r"\(")):
            parse_where(text)


def test_dead_letters_keep_the_originals_headers_but_streamflows_own() -> None:
    batch = consumed([b"x"], [[("trace", b"t-1"), ("streamflow.stage", b"forged")]])
    letter = dead_letter_batch(DLQ, "p", "clean", [Failure(0, "parse", ValueError("bad"))], batch)
    headers = letter.headers[0]
    assert headers is not None
    assert headers[0] == ("trace", b"t-1")
    assert [value for name, value in headers if name == "streamflow.stage"] == [b"clean"]


def test_read_select_and_show_dead_letters(transport: Transport) -> None:
    dead_letter(transport, "clean", [ValueError("v"), KeyError("k")], [b"{bad", b"\xff\x00"],
                [None, [("trace", b"t-2")]])
    dead_letter(transport, "lake", [ValueError("w")], [b"\x1b[31mred"], [None])
    everything = list(read_letters(transport, [DLQ], None, []))
    assert sorted(letter.value for letter in everything) == [b"\x1b[31mred", b"{bad", b"\xff\x00"]
    assert [letter.value for letter in read_letters(transport, [DLQ], "clean", [])
            if letter.text["streamflow.error.class"] == "KeyError"] == [b"\xff\x00"]
    selected = list(read_letters(transport, [DLQ], None,
                                 parse_where("error.class = 'ValueError' and stage != 'lake'")))
    assert [letter.value for letter in selected] == [b"{bad"]

    [binary] = [letter for letter in everything if letter.value == b"\xff\x00"]
    doc = document(binary)
    assert base64.b64decode(doc["value_base64"]) == b"\xff\x00" and doc["key"] == "k1"
    assert doc["headers"]["trace"] == "t-2" and doc["headers"]["streamflow.original.offset"] == "11"

    out = io.StringIO()
    write_letters(iter(everything), 2, False, out, [DLQ])
    text = out.getvalue()
    assert "\x1b" not in text  # a dead letter cannot drive the terminal
    assert text.rstrip().endswith("2 of 3 dead letters in p.dlq shown; by error class: "
                                  "ValueError 2, KeyError 1")
    assert "  streamflow.error.message: 'k'" in text
    out = io.StringIO()
    write_letters(iter(everything), 0, True, out, [DLQ])
    assert [json.loads(line)["value"] for line in out.getvalue().splitlines()] == [
        document(letter)["value"] for letter in everything]
    assert printable("a\x1b[2Jb\n\u009b") == "a\\x1b[2Jb\\n\\x9b"


def test_replay_publishes_the_originals_with_their_own_headers(transport: Transport) -> None:
    dead_letter(transport, "clean", [ValueError("v"), KeyError("k")], [b"one", b"two"],
                [[("trace", b"t-1")], None])
    truncated = dead_letter_batch(DLQ, "p", "clean", [Failure(0, "produce", ValueError("big"))],
                                  consumed([b"cut"], [None]))
    truncated.headers[0].append(("streamflow.truncated", b"true"))  # type: ignore[union-attr]
    producer = transport.producer()
    producer.produce([truncated])
    producer.close()

    with pytest.raises(DeadLetterToolError, match="'nowhere' does not exist"):
        replay_letters(transport, read_letters(transport, [DLQ], None, []), "nowhere")
    assert replay_letters(transport, read_letters(transport, [DLQ], None, []), "again",
                          dry_run=True) == (2, 1)
    first = parse_where("error.class = 'ValueError' and step = 'parse'")
    assert replay_letters(transport, read_letters(transport, [DLQ], None, first), "again") == (1, 0)
    reader = transport.reader({("again", 0): None})
    batch = reader.read_batch(10, 1.0)
    reader.close()
    assert (batch.values, batch.keys, batch.headers) == ([b"one"], [b"k0"], [[("trace", b"t-1")]])
    assert batch.timestamps_ms == [1_700_000_000_000]


def test_dead_letter_topics_of_a_pipeline_and_of_one_stage() -> None:
    config = parse_pipeline({
        "pipeline": "p",
        "sources": [{"name": "gen", "type": "generator", "topic": "raw"}],
        "processors": [{"name": "clean", "input": "raw", "output": "ok", "steps": [],
                        "dead_letter": "clean.dlq"}],
        "sinks": [{"name": "out", "type": "console", "input": "ok"}],
    })
    assert dead_letter_topics(config) == ["clean.dlq", "p.dlq"]
    assert dead_letter_topics(config, "clean") == ["clean.dlq"]
    assert dead_letter_topics(config, "gen") == ["p.dlq"]
    with pytest.raises(DeadLetterToolError, match="choose one of: gen, clean, out"):
        dead_letter_topics(config, "nope")


def test_the_dlq_file_copies_the_dead_letters_of_the_run_only(transport: Transport,
                                                              tmp_path: Path) -> None:
    dead_letter(transport, "clean", [ValueError("before")], [b"old"], [None])
    path = tmp_path / "sub" / "dead.jsonl"
    with DeadLetterFile(transport, [DLQ], path) as copy:
        dead_letter(transport, "clean", [ValueError("during")] * 3, [b"a", b"b", b"\xfe"], [None] * 3)
        producer = transport.producer()  # the last moments: written just before the copy ends
        producer.produce([OutgoingBatch(DLQ, [b"late"], [None], [[("streamflow.stage", b"x")]])])
        producer.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(line["value"] for line in lines) == ["a", "b", "late", "\ufffd"]
    assert copy.written == 4
    assert {line["headers"].get("streamflow.error.message") for line in lines} == {"during", None}
