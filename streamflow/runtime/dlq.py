"""Dead-letter tools: ``streamflow dlq show`` and ``dlq replay``, and ``run --dlq-file``.

Dead letters are read through the transport's :class:`~streamflow.transport.Reader` (committed
records only, as a member of no group, so nothing is committed and no stage is disturbed). A
selection (``--stage``, ``--where``) looks only at their ``streamflow.*`` headers; ``--where`` is
a small grammar, never evaluated: ``NAME = 'value'`` or ``NAME != 'value'`` joined by ``and``,
where NAME is a ``streamflow.*`` header with or without its prefix (``error.class``).
"""

from __future__ import annotations

import argparse
import base64
import difflib
import json
import logging
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from streamflow.config import PipelineConfig, load_pipeline
from streamflow.config.models import default_dead_letter_topic
from streamflow.runtime.dead_letters import (
    HEADER_NAMES,
    HEADER_PREFIX,
    TRUNCATED_HEADER,
    original_headers,
)
from streamflow.runtime.logs import REDACTOR, config_secrets
from streamflow.transport import (
    ConsumedBatch,
    OutgoingBatch,
    Reader,
    TopicPartition,
    Transport,
    TransportError,
    create_transport,
)
from streamflow.transport.base import Headers

log = logging.getLogger(__name__)

EXIT_USAGE = 2
READ_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 30.0  # for --dlq-file to copy what the run's last moments dead-lettered
BATCH = 1000
PREVIEW_CHARS = 500


class DeadLetterToolError(Exception):
    """A dlq command cannot do what was asked; the message says why and what to do."""


# -- selecting dead letters ------------------------------------------------------------------

_TOKEN = re.compile(r"""\s*(?:(?P<op>!=|=)|(?P<word>[\w.-]+)
                          |'(?P<single>(?:[^']|'')*)'|"(?P<double>(?:[^"]|"")*)")""", re.VERBOSE)


@dataclass(frozen=True)
class Condition:
    """``header = value`` (or ``!=`` when ``negated``); a missing header equals no value."""

    header: str
    value: str
    negated: bool

    def holds(self, headers: dict[str, str]) -> bool:
        return (headers.get(self.header) == self.value) != self.negated


def header_name(name: str) -> str:
    """The full name of a ``streamflow.*`` header, given with or without its prefix."""
    short = name.removeprefix(HEADER_PREFIX)
    if short not in HEADER_NAMES:
        close = difflib.get_close_matches(short, HEADER_NAMES, 1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DeadLetterToolError(f"--where: dead letters have no header {name!r}; {hint}"
                                  f"choose from {', '.join(HEADER_NAMES)}")
    return HEADER_PREFIX + short


def parse_where(text: str) -> list[Condition]:
    """The conditions of a ``--where`` text, all of which must hold."""
    tokens: list[tuple[str, str]] = []
    position = 0
    while text[position:].strip():
        match = _TOKEN.match(text, position)
        if match is None:
            raise DeadLetterToolError(
                f"--where: cannot read {text[position:].strip()!r}; write conditions like "
                "error.class = 'SchemaViolation' and stage != 'clean'")
        kind = match.lastgroup or ""
        if kind in ("single", "double"):
            quote = "'" if kind == "single" else '"'
            tokens.append(("value", match[kind].replace(quote * 2, quote)))
        else:
            tokens.append((kind, match[kind]))
        position = match.end()
    conditions, index = [], 0
    while True:
        clause = tokens[index:index + 4]
        if [kind for kind, _ in clause[:3]] != ["word", "op", "value"]:
            seen = " ".join(repr(token) if kind == "value" else token for kind, token in clause)
            raise DeadLetterToolError(f"--where: expected NAME = 'value' or NAME != 'value' at "
                                      f"{seen or 'the end'} (values in quotes)")
        name, operator, value = (token for _, token in clause[:3])
        conditions.append(Condition(header_name(name), value, operator == "!="))
        if len(clause) < 4:
            return conditions
        if clause[3][0] != "word" or clause[3][1].lower() != "and":
            raise DeadLetterToolError(
                f"--where: conditions are joined by 'and', not {clause[3][1]!r}")
        index += 4


def text_headers(headers: Headers | None) -> dict[str, str]:
    """``headers`` as text (a repeated name keeps its last value)."""
    return {name: (data or b"").decode("utf-8", "replace") for name, data in headers or ()}


# -- reading ---------------------------------------------------------------------------------

def dead_letter_topics(config: PipelineConfig, stage: str | None = None) -> list[str]:
    """The dead-letter topics of ``config``'s sources and stages, or of the one named ``stage``."""
    by_component = {source.name: default_dead_letter_topic(config.pipeline)
                    for source in config.sources}
    by_component.update({component.name: config.dead_letter_topic(component) for component in
                         [*config.processors, *config.models, *config.sinks]})
    if stage is None:
        return sorted(set(by_component.values()))
    if stage not in by_component:
        raise DeadLetterToolError(f"--stage {stage!r} is not in pipeline {config.pipeline!r}; "
                                  f"choose one of: {', '.join(by_component)}")
    return [by_component[stage]]


def partitions_of(transport: Transport, topics: Sequence[str]) -> list[TopicPartition]:
    """Every partition of those of ``topics`` that exist."""
    admin = transport.admin()
    try:
        counts = admin.describe_topics(list(topics))
    finally:
        admin.close()
    return [(topic, number) for topic in topics for number in range(counts.get(topic, 0))]


def read_to_end(reader: Reader, timeout_s: float) -> Iterator[ConsumedBatch]:
    """Batches of ``reader`` until it reaches where its partitions end now; records written
    meanwhile may come too. Raises TransportError when that takes over ``timeout_s``."""
    ends = reader.end_offsets()
    deadline = time.monotonic() + timeout_s
    while any(reader.position()[partition] < end for partition, end in ends.items()):
        if time.monotonic() > deadline:
            raise TransportError(f"could not read the dead letters up to {ends} in "
                                 f"{timeout_s:g} s (read up to {reader.position()})")
        batch = reader.read_batch(BATCH, 0.2)
        if len(batch):
            yield batch


@dataclass(frozen=True)
class Letter:
    """One dead letter as read, with its headers as text."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: Headers
    text: dict[str, str]


def letters(batches: Iterable[ConsumedBatch]) -> Iterator[Letter]:
    for batch in batches:
        for row in range(len(batch)):
            headers = (batch.headers[row] if batch.headers else None) or []
            yield Letter(batch.topics[row], batch.partitions[row], batch.offsets[row],
                         batch.timestamps_ms[row], batch.keys[row], batch.values[row] or b"",
                         headers, text_headers(headers))


def read_letters(transport: Transport, topics: Sequence[str], stage: str | None,
                 conditions: Sequence[Condition], timeout_s: float = READ_TIMEOUT_S
                 ) -> Iterator[Letter]:
    """The dead letters now in ``topics`` (all of their partitions, in offset order within
    each), of ``stage`` if given, for which every condition holds."""
    partitions = partitions_of(transport, topics)
    if not partitions:
        return
    reader = transport.reader(dict.fromkeys(partitions))
    try:
        for letter in letters(read_to_end(reader, timeout_s)):
            if stage is not None and letter.text.get(HEADER_PREFIX + "stage") != stage:
                continue
            if all(condition.holds(letter.text) for condition in conditions):
                yield letter
    finally:
        reader.close()


# -- presenting ------------------------------------------------------------------------------

def _bytes_fields(name: str, data: bytes | None) -> dict[str, Any]:
    """``{name: text}``, and ``{name_base64: ...}`` too when ``data`` is not UTF-8."""
    if data is None:
        return {name: None}
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {name: data.decode("utf-8", "replace"),
                f"{name}_base64": base64.b64encode(data).decode()}


def document(letter: Letter, mask: Callable[[str], str] = str) -> dict[str, Any]:
    """A dead letter as JSON: where it is, its key and value (as UTF-8 text, and in base64 as
    well when they are not UTF-8) and its headers, their values passed through ``mask``."""
    return {"topic": letter.topic, "partition": letter.partition, "offset": letter.offset,
            "timestamp_ms": letter.timestamp_ms, **_bytes_fields("key", letter.key),
            **_bytes_fields("value", letter.value),
            "headers": {name: mask(value) for name, value in letter.text.items()}}


def printable(text: str) -> str:
    """``text`` with every character a terminal could act on (controls, escapes) escaped."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def render(letter: Letter, mask: Callable[[str], str]) -> list[str]:
    """A dead letter as text lines: its place and time, each header, its key and a preview of
    its value."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.timestamp_ms / 1000))
    lines = [f"{letter.topic} partition {letter.partition} offset {letter.offset}  "
             f"(record time {when} UTC)"]
    lines += [f"  {printable(name)}: {printable(mask(value))}"
              for name, value in letter.text.items()]
    if letter.key is not None:
        lines.append(f"  key: {printable(letter.key.decode('utf-8', 'replace'))}")
    value = letter.value.decode("utf-8", "replace")
    cut = (f"  ({PREVIEW_CHARS:,} of {len(value):,} characters)"
           if len(value) > PREVIEW_CHARS else "")
    lines.append(f"  value: {printable(value[:PREVIEW_CHARS])}{cut}")
    return lines


# -- the commands ----------------------------------------------------------------------------

def _transport(config: PipelineConfig, bootstrap: str | None) -> Transport:
    address = bootstrap or config.kafka.bootstrap
    if address == "embedded":
        raise DeadLetterToolError(
            f"pipeline {config.pipeline!r} runs on the embedded broker, whose topics end with "
            "each run: its dead letters are in the file `streamflow run --dlq-file PATH` wrote "
            "(`make run` writes output/quickstart/dead-letters.jsonl); to keep them in Kafka, "
            "run a broker that outlives the pipeline (`streamflow broker`, then "
            "STREAMFLOW_BOOTSTRAP or kafka.bootstrap) and pass --bootstrap HOST:PORT here")
    REDACTOR.add(config_secrets(config))
    return create_transport(config.kafka.client, address, config.kafka.client_settings())


def write_letters(selected: Iterable[Letter], limit: int, as_json: bool, out: IO[str],
                  topics: Sequence[str]) -> None:
    """The first ``limit`` (0: all) of ``selected``: as JSON lines, or as text followed by how
    many were selected by error class."""
    total, classes = 0, Counter[str]()
    for letter in selected:
        total += 1
        classes[letter.text.get(HEADER_PREFIX + "error.class", "?")] += 1
        if limit and total > limit:
            continue
        if as_json:
            out.write(json.dumps(document(letter, REDACTOR.mask)) + "\n")
        else:
            out.write("\n".join(render(letter, REDACTOR.mask)) + "\n\n")
    if not as_json:
        shown = min(total, limit) if limit else total
        by_class = ", ".join(f"{printable(name)} {count:,}" for name, count in classes.most_common())
        out.write(f"{shown:,} of {total:,} dead letters in {', '.join(topics)} shown"
                  + (f"; by error class: {by_class}" if by_class else "") + "\n")


def replay_letters(transport: Transport, selected: Iterable[Letter], to: str,
                   dry_run: bool = False) -> tuple[int, int]:
    """Publish the original record of each of ``selected`` (value, key, timestamp, and headers
    but streamflow's) to the topic ``to``, skipping truncated copies; returns how many were
    published (or would be, with ``dry_run``) and how many skipped."""
    if not partitions_of(transport, [to]):
        raise DeadLetterToolError(f"--to: topic {to!r} does not exist; name one of the "
                                  "pipeline's topics, or create it first")
    producer = None if dry_run else transport.producer()
    sent = skipped = 0
    pending: list[Letter] = []

    def publish() -> None:
        nonlocal sent
        if producer is not None and pending:
            producer.produce([OutgoingBatch(
                to, [letter.value for letter in pending], [letter.key for letter in pending],
                [original_headers(letter.headers) or None for letter in pending],
                [letter.timestamp_ms for letter in pending])])
        sent += len(pending)
        pending.clear()

    try:
        for letter in selected:
            if TRUNCATED_HEADER in letter.text:
                skipped += 1
                continue
            pending.append(letter)
            if len(pending) >= BATCH:
                publish()
        publish()
    except TransportError as exc:
        raise DeadLetterToolError(f"replay stopped after {sent:,} records were published to "
                                  f"{to}: {exc}") from exc
    finally:
        if producer is not None:
            producer.close()
    return sent, skipped


def _selected(args: argparse.Namespace) -> tuple[Transport, list[str], Iterator[Letter]]:
    """The transport, dead-letter topics and selected dead letters the arguments name."""
    config = load_pipeline(args.file)
    conditions = parse_where(args.where) if args.where else []
    topics = dead_letter_topics(config, args.stage)
    transport = _transport(config, args.bootstrap)
    return transport, topics, read_letters(transport, topics, args.stage, conditions)


def show(args: argparse.Namespace, out: IO[str]) -> int:
    """``streamflow dlq show``."""
    _, topics, selected = _selected(args)
    write_letters(selected, args.limit, args.json, out, topics)
    return 0


def replay(args: argparse.Namespace, out: IO[str]) -> int:
    """``streamflow dlq replay``."""
    transport, topics, selected = _selected(args)
    if args.to in topics:
        raise DeadLetterToolError(f"--to: {args.to} is a dead-letter topic this replay reads; "
                                  "publish to the topic the records came from, or another")
    sent, skipped = replay_letters(transport, selected, args.to, args.dry_run)
    verb = "would publish" if args.dry_run else "published"
    note = (f"; skipped {skipped:,} truncated copies (their records were too large for Kafka, "
            "so their values were cut)" if skipped else "")
    out.write(f"{verb} {sent:,} dead letters' original records to {args.to}{note}\n")
    return 0


def _run(command: Callable[[argparse.Namespace, IO[str]], int]
         ) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args, sys.stdout)
        except DeadLetterToolError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except TransportError as exc:
            print(f"error: cannot read the dead letters from Kafka: {exc}", file=sys.stderr)
            return 1
    return run


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``streamflow dlq show|replay`` on the CLI's subcommands."""
    dlq = commands.add_parser("dlq", help="look at a pipeline's dead letters, publish them again")
    actions = dlq.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("file", help="pipeline YAML file")
    common.add_argument("--stage", help="only the dead letters of this source or stage")
    common.add_argument("--where", metavar="CONDITIONS",
                        help="only dead letters whose headers match, e.g. \"error.class = "
                             "'SchemaViolation' and step != 'sql'\" (= and != joined by and)")
    common.add_argument("--bootstrap", metavar="HOST:PORT", help="override kafka.bootstrap")
    show_parser = actions.add_parser("show", parents=[common],
                                     help="list dead letters with their headers")
    show_parser.add_argument("--limit", type=int, default=20, metavar="N",
                             help="show the first N (default 20; 0 shows all)")
    show_parser.add_argument("--json", action="store_true",
                             help="one JSON object a line per dead letter, and no summary")
    show_parser.set_defaults(handler=_run(show))
    replay_parser = actions.add_parser(
        "replay", parents=[common],
        help="publish the selected dead letters' original records to a topic")
    replay_parser.add_argument("--to", required=True, metavar="TOPIC", help="where to publish")
    replay_parser.add_argument("--dry-run", action="store_true",
                               help="count what would be published, publish nothing")
    replay_parser.set_defaults(handler=_run(replay))


# -- run --dlq-file --------------------------------------------------------------------------

class DeadLetterFile:
    """Copies the records that reach ``topics`` while it runs into a JSON-lines file at
    ``path`` (one :func:`document` a line), so that the dead letters of a run on the embedded
    broker outlive it. Used as a context manager around the run: on exit it copies what the
    topics hold up to their end, then closes the file."""

    def __init__(self, transport: Transport, topics: Sequence[str], path: Path) -> None:
        self.transport = transport
        self.topics = list(topics)
        self.path = path
        self.written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._copy, name="dead-letter-file", daemon=True)
        self._reader: Reader | None = None
        self._file: IO[str] | None = None

    def __enter__(self) -> DeadLetterFile:
        partitions = partitions_of(self.transport, self.topics)
        probe = self.transport.reader(dict.fromkeys(partitions))
        try:
            ends = probe.end_offsets()  # this run's dead letters start there
        finally:
            probe.close()
        self._reader = self.transport.reader(dict(ends))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")  # closed by _copy
        self._thread.start()
        log.info("writing the dead letters of %s to %s", ", ".join(self.topics), self.path)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(DRAIN_TIMEOUT_S + 10)
        log.info("wrote %d dead letters to %s", self.written, self.path)

    def _write(self, batch: ConsumedBatch) -> None:
        assert self._file is not None
        for letter in letters([batch]):
            self._file.write(json.dumps(document(letter, REDACTOR.mask)) + "\n")
        self._file.flush()
        self.written += len(batch)

    def _copy(self) -> None:
        assert self._reader is not None and self._file is not None
        try:
            while not self._stop.is_set():
                if len(batch := self._reader.read_batch(BATCH, 0.5)):
                    self._write(batch)
            for batch in read_to_end(self._reader, DRAIN_TIMEOUT_S):
                self._write(batch)
        except Exception as exc:  # the run goes on; the file says how far it got
            log.error("the dead-letter file %s stops after %d records: %s", self.path,
                      self.written, exc)
            log.debug("dead-letter file failed", exc_info=True)
        finally:
            self._reader.close()
            self._file.close()
