"""Source runners: poll a source, publish its records, then checkpoint its position.

Positions live in a compacted Kafka topic (as in Kafka Connect), keyed by pipeline and source.
Each polled batch and the position after it are written in one Kafka transaction (as Kafka
Connect's exactly-once sources do), so a restart resumes with nothing skipped and nothing
repeated. The transactional id is fixed per source: a restarted runner fences its predecessor
and aborts the transaction it left open before reading the positions.

Tansu 0.6.0, the embedded broker, hides open transactions but shows aborted records to
read_committed consumers; there a batch cut off by a crash becomes visible together with the
position written in the same produce request, which keeps the two consistent in practice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

from streamflow.metrics import SourceMetrics
from streamflow.plugins import Source
from streamflow.transport import OutgoingBatch, TopicSpec, Transport

log = logging.getLogger(__name__)

POSITIONS_TOPIC = "_streamflow.source-positions"
POSITIONS_TOPIC_SPEC = TopicSpec(POSITIONS_TOPIC, partitions=1, config={"cleanup.policy": "compact"})
POLL_TIMEOUT_S = 0.2
READ_POSITIONS_TIMEOUT_S = 30.0


def read_positions(transport: Transport, pipeline: str) -> dict[str, Any]:
    """The last checkpointed position of each source of ``pipeline``, by source name."""
    consumer = transport.consumer(f"{pipeline}.positions-reader.{uuid.uuid4().hex}",
                                  [POSITIONS_TOPIC])
    positions: dict[str, Any] = {}
    prefix = f"{pipeline}/"
    deadline = time.monotonic() + READ_POSITIONS_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            batch = consumer.consume_batch(1000, 0.2)
            for key, value in zip(batch.keys, batch.values, strict=True):
                name = (key or b"").decode()
                if name.startswith(prefix) and value is not None:
                    positions[name[len(prefix):]] = json.loads(value)
            if not len(batch) and consumer.assignment() and sum(consumer.lag().values()) == 0:
                return positions
        raise TimeoutError(f"could not read {POSITIONS_TOPIC} in {READ_POSITIONS_TIMEOUT_S}s")
    finally:
        consumer.close()


class SourceRunner:
    """Runs one source in its own thread until it is exhausted or stopped."""

    def __init__(
        self,
        pipeline: str,
        source: Source[Any],
        topic: str,
        transport: Transport,
        metrics: SourceMetrics,
        max_records: int,
    ) -> None:
        self.pipeline = pipeline
        self.source = source
        self.topic = topic
        self.transport = transport
        self.metrics = metrics
        self.max_records = max_records
        self.name = source.context.name
        self.finished = False
        self.finished_at = 0.0  # monotonic time the source ran out of records
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"source-{self.name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        producer = None
        try:
            producer = self.transport.producer(transactional_id=f"{self.pipeline}.source.{self.name}")
            self.source.open(read_positions(self.transport, self.pipeline).get(self.name))
            position_key = f"{self.pipeline}/{self.name}".encode()
            while not self._stop.is_set():
                batch = self.source.poll(self.max_records, POLL_TIMEOUT_S)
                if batch is None:
                    self.finished_at = time.monotonic()
                    self.finished = True
                    log.info("source %s finished", self.name)
                    return
                if not len(batch):
                    continue
                position = self.source.position()
                producer.begin_transaction()
                producer.produce([
                    OutgoingBatch(self.topic, batch.values, batch.keys,
                                  timestamps_ms=batch.timestamps_ms),
                    OutgoingBatch(POSITIONS_TOPIC, [json.dumps(position).encode()], [position_key]),
                ])
                producer.commit_transaction()
                self.metrics.records_produced.inc(len(batch))
                self.source.acknowledged(position)
        except BaseException as exc:
            self.metrics.errors.inc()
            log.exception("source %s failed", self.name)
            self.error = exc
        finally:
            self.source.close()
            if producer is not None:
                producer.close()
