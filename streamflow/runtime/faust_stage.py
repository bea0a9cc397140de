"""A processor stage run by a user's Faust agent (``type: faust``, ``agent: module:function``).

streamflow builds the ``faust.App`` (consumer group ``<pipeline>.<stage>``, web server off, data
in a temporary directory) and runs it in a thread of its own with its own event loop, under the
same supervisor interface as the other stages. The agent is an ordinary Faust agent body::

    async def enrich(stream):
        async for event in stream:          # event: the record, parsed from JSON
            if event["temperature"] > -50:
                yield {**event, "temperature_f": event["temperature"] * 1.8 + 32}

Every yielded value goes to the stage's output topic with the input record's key and timestamp;
an event for which the agent yields nothing counts as filtered. A record that is not a JSON
object, or whose handling raises, goes to the dead-letter topic; the agent function is then
called again on the rest of the stream, so one bad event never stops the stage.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

from streamflow.metrics import StageMetrics
from streamflow.plugins.agents import AgentFunction, require_faust
from streamflow.processing.codec import DecodeError
from streamflow.runtime.dead_letters import Failure, dead_letter_batch
from streamflow.runtime.stage import Stage
from streamflow.runtime.stages import StageIdentity
from streamflow.transport import ConsumedBatch, TopicPartition, TransportError

log = logging.getLogger(__name__)

MONITOR_INTERVAL_S = 0.2
LAG_CHECK_INTERVAL_S = 1.0
PRODUCER_LINGER_S = 0.005  # batch outputs as librdkafka does; one record per request is ~1k/s
AGENT_STEP = "agent"
FAUST_LOGGERS = ("faust", "mode", "aiokafka")


class AgentReturnedError(RuntimeError):
    """The agent function returned while its stream still had events."""


def parse_event(value: bytes | None) -> dict[str, Any]:
    """A record value as a JSON object."""
    if not value:
        raise DecodeError("empty record value")
    try:
        document = json.loads(value)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise DecodeError(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise DecodeError(f"expected a JSON object, got {type(document).__name__}")
    return document


def consumed_record(message: Any) -> ConsumedBatch:
    """A Faust message as a one-record batch, the form dead letters are built from."""
    return ConsumedBatch(
        topics=[message.topic], partitions=[message.partition], offsets=[message.offset],
        keys=[message.key], values=[message.value],
        timestamps_ms=[int(message.timestamp * 1000)], headers=[list(message.headers or ())],
    )


class EventFeed:
    """The stream an agent iterates: parsed event values, one at a time.

    It accounts for each event once the agent asks for the next one (or the stream ends):
    records in, values yielded for it, and whether it was dead-lettered.
    """

    def __init__(self, stage: FaustStage, events: AsyncIterator[Any]) -> None:
        self._stage = stage
        self._events = events
        self.current: Any = None  # the Faust event being handled
        self.outputs = 0
        self.dead_lettered = False
        self.exhausted = False

    def __aiter__(self) -> EventFeed:
        return self

    async def __anext__(self) -> dict[str, Any]:
        self.settle()
        while True:
            try:
                event = await self._events.__anext__()
            except StopAsyncIteration:
                self.exhausted = True
                raise
            self._stage.idle_since = time.monotonic()
            try:
                value = parse_event(event.message.value)
            except DecodeError as exc:
                self.current = event
                await self.dead_letter("parse", exc)
                self.settle()
                continue
            self.current = event
            return value

    def settle(self) -> None:
        """Count the current event, now that the agent is done with it."""
        if self.current is None:
            return
        stage = self._stage
        stage.idle_since = time.monotonic()  # its outputs were just sent: activity
        stage.metrics.count(1, self.outputs, int(self.dead_lettered))
        message = self.current.message
        stage.handled[(message.topic, message.partition)] = message.offset + 1
        self.current, self.outputs, self.dead_lettered = None, 0, False

    async def emit(self, value: Any) -> None:
        """Send one value the agent yielded for the current event to the output topic."""
        try:
            encoded = json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            await self.dead_letter(AGENT_STEP, exc)
            return
        message = self.current.message
        await self._stage.output.send(key=message.key, value=encoded, timestamp=message.timestamp)
        self.outputs += 1

    async def dead_letter(self, step: str, error: BaseException) -> None:
        """Dead-letter the current event (once, however often its handling fails)."""
        if self.dead_lettered:
            return
        self.dead_lettered = True
        stage = self._stage
        identity = stage.identity
        record = consumed_record(self.current.message)
        batch = dead_letter_batch(identity.dead_letter_topic, identity.pipeline, identity.name,
                                  [Failure(0, step, error)], record)
        for value, key, headers, timestamp_ms in batch.records():
            await stage.dead_letters.send(key=key, value=value, headers=headers,
                                          timestamp=timestamp_ms / 1000 if timestamp_ms else None)
        stage.metrics.latest_dead_letters.add([batch])
        stage.metrics.error(step).inc()
        stage.metrics.reasons.add([(step, error)])


class FaustStage(Stage):
    """Runs a Faust app whose one agent is the user's function, in its own thread and loop."""

    def __init__(
        self,
        identity: StageIdentity,
        bootstrap: str,
        metrics: StageMetrics,
        output_topic: str,
        agent: AgentFunction,
        partitions: int,
        session_timeout_s: float = 6.0,
    ) -> None:
        super().__init__(identity.name, f"stage-{identity.name}")
        self.faust = require_faust()
        self.kafka_errors = importlib.import_module("aiokafka.errors")  # installed with faust
        self.identity = identity
        self.bootstrap = bootstrap
        self.metrics = metrics
        self.output_topic = output_topic
        self.agent = agent
        self.partitions = partitions
        self.session_timeout_s = session_timeout_s
        self.idle_since = time.monotonic()
        self.lag: int | None = None
        self.lag_checked_at = 0.0  # monotonic time of the measurement behind ``lag``
        self.assigned = False
        self._agent_error: BaseException | None = None
        self.feed: EventFeed | None = None
        self.handled: dict[TopicPartition, int] = {}  # next offset after the last handled event
        self._committed: dict[TopicPartition, int] = {}
        self.app: Any = None
        self.output: Any = None
        self.dead_letters: Any = None

    @property
    def last_activity(self) -> float:
        return self.idle_since

    def starting(self) -> str | None:
        return None if self.assigned else "joining its consumer group"

    def is_idle(self, since: float) -> bool:
        """No event being handled, and nothing left to read on the assigned partitions as
        measured after ``since`` (the pipeline's last activity)."""
        return (
            self.lag == 0
            and self.lag_checked_at > since
            and (self.feed is None or self.feed.current is None)
            and self.thread.is_alive()
        )

    def _run(self) -> None:
        data_dir = tempfile.mkdtemp(prefix=f"streamflow-faust-{self.identity.group_id}-")
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(data_dir))
        except BaseException as exc:
            log.debug("stage %s failed", self.name, exc_info=True)  # the supervisor says why
            self.error = exc
        finally:
            loop.close()
            shutil.rmtree(data_dir, ignore_errors=True)

    def _build_app(self, data_dir: str) -> Any:
        if not log.isEnabledFor(logging.DEBUG):  # Faust logs every service start and stop
            for library in FAUST_LOGGERS:
                logging.getLogger(library).setLevel(logging.WARNING)
        faust = self.faust
        identity = self.identity
        app = faust.App(
            identity.group_id,
            broker=[f"kafka://{server.strip()}" for server in self.bootstrap.split(",")],
            value_serializer="json",
            datadir=data_dir,
            web_enabled=False,
            topic_partitions=self.partitions,
            topic_allow_declare=False,  # the pipeline creates its topics
            topic_disable_leader=True,
            consumer_auto_offset_reset="earliest",
            broker_session_timeout=self.session_timeout_s,
            broker_heartbeat_interval=self.session_timeout_s / 6,
            broker_commit_interval=1.0,
            producer_linger=PRODUCER_LINGER_S,
        )
        raw = {"key_serializer": "raw", "value_serializer": "raw"}
        source = app.topic(identity.input_topic, **raw)
        self.output = app.topic(self.output_topic, **raw)
        self.dead_letters = app.topic(identity.dead_letter_topic, **raw)
        app.agent(source, name=f"{identity.name}-agent")(self._drive)
        app.on_rebalance_complete.connect(self._on_rebalance_complete)
        # Every commit Faust makes (periodic, on rebalance, on stop) goes through this stage's
        # bookkeeping: Faust's own stalls at offset gaps such as the transaction markers that
        # sources write (faust-streaming/faust#606).
        app.consumer.commit = self._commit_handled
        self.app = app
        return app

    async def _commit_handled(self, *_topics: Any, **_options: Any) -> bool:
        """Commit, per assigned partition, the offset after the last event the agent finished,
        once the producer delivered everything sent so far (outputs and dead letters)."""
        consumer = self.app.consumer
        offsets = {
            tp: self.handled[(tp.topic, tp.partition)] for tp in consumer.assignment()
            if self.handled.get((tp.topic, tp.partition), -1)
            > self._committed.get((tp.topic, tp.partition), -1)
        }
        if not offsets:
            return False
        await self.app.producer.flush()
        try:
            committed = bool(await consumer._commit(offsets))
        except self.kafka_errors.KafkaError as exc:  # e.g. a rebalance: the records replay
            log.warning("stage %s: commit refused (%s); records will be replayed", self.name, exc)
            return False
        if committed:
            self._committed.update({(tp.topic, tp.partition): offset for tp, offset in offsets.items()})
            self.metrics.checkpoint_time.set(time.time())
        return committed

    async def _drive(self, stream: Any) -> None:
        """The Faust agent; a failure outside the user's code stops the stage."""
        self.feed = EventFeed(self, stream.events())
        try:
            await self._feed_agent(self.feed)
        except Exception as exc:
            self._agent_error = exc
            raise

    async def _feed_agent(self, feed: EventFeed) -> None:
        """Feed events to the user's function, calling it again after it failed on one."""
        while True:
            try:
                async for value in self.agent(feed):
                    await feed.emit(value)
            except Exception as exc:
                if feed.current is None:
                    raise
                message = feed.current.message
                log.debug("stage %s: agent failed on %s[%d]@%d (%s: %s); dead-lettered",
                          self.name, message.topic, message.partition, message.offset,
                          type(exc).__name__, exc)
                await feed.dead_letter(AGENT_STEP, exc)
                continue
            if feed.exhausted:
                return
            raise AgentReturnedError(
                f"agent of stage {self.name!r} returned before its stream ended; "
                "iterate the whole stream (async for event in stream: ...)"
            )

    async def _on_rebalance_complete(self, _sender: Any, **_kwargs: Any) -> None:
        self.assigned = True
        log.info("stage %s assigned %s", self.name,
                 sorted((tp.topic, tp.partition) for tp in self.app.consumer.assignment()))

    async def _serve(self, data_dir: str) -> None:
        app = self._build_app(data_dir)
        try:
            await app.start()
            lag_checked = 0.0
            while not self._stop.is_set():
                await asyncio.sleep(MONITOR_INTERVAL_S)
                self._raise_failure(app)
                if time.monotonic() - lag_checked >= LAG_CHECK_INTERVAL_S:
                    lag_checked = time.monotonic()
                    await self._check_lag(app)
        finally:
            await app.stop()
        self._raise_failure(app)

    def _raise_failure(self, app: Any) -> None:
        """Re-raise what stopped the agent or the app; Kafka failures as TransportError."""
        error = self._agent_error or app.crash_reason
        if error is None:
            return
        if isinstance(error, self.kafka_errors.KafkaError | self.faust.exceptions.FaustError):
            raise TransportError(f"faust stage {self.name}: {type(error).__name__}: {error}") from error
        raise error

    async def _check_lag(self, app: Any) -> None:
        """Records between the consumer's position and the end of each assigned partition."""
        measured_at = time.monotonic()
        consumer = app.consumer
        assignment = consumer.assignment()
        try:
            highwaters = await consumer.highwaters(*assignment) if assignment else {}
            positions = {tp: await consumer.position(tp) for tp in assignment}
        except self.kafka_errors.KafkaError as exc:  # e.g. a rebalance took a partition away
            log.debug("stage %s: lag unknown (%s)", self.name, exc)
            self.lag = None
            return
        lags = {}
        for tp in assignment:
            if highwaters.get(tp) is None or positions[tp] is None:
                self.lag = None
                return
            lags[tp] = max(highwaters[tp] - positions[tp], 0)
            self.metrics.lag(tp.topic, tp.partition).set(lags[tp])
        self.lag = sum(lags.values()) if assignment else None
        self.lag_checked_at = measured_at
