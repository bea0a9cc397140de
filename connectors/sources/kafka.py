"""Kafka: copies topics of another cluster into the pipeline's topic (keys, values, timestamps).

A copy keeps its record's timestamp by default, as MirrorMaker does, or is stamped with the time
of copying (``timestamps: copying``), which Kafka's retention then counts from.

The position is the next offset to copy of every partition seen, checkpointed with the
pipeline's source positions after the copies were acknowledged; records below it are skipped on
a restart, so the copy resumes exactly where it stopped. The same offsets are then committed to
``group_id`` on the external cluster, only so that the consumer starts near the position and
external tools see the lag: the checkpoint stays the truth. Headers are not copied; tombstones
(null values) are copied as tombstones.
"""

from __future__ import annotations

import logging
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from streamflow.config.models import KafkaConfig
from streamflow.plugins import ComponentContext, Source, SourceBatch, TransientError
from streamflow.transport import Consumer, TopicPartition, TransportError, create_transport

log = logging.getLogger(__name__)


class KafkaSourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bootstrap: str = Field(description="the external cluster: host:port[,host:port...]")
    topics: list[str] = Field(min_length=1, description="topics to copy from the external cluster")
    client: Literal["confluent", "kafka-python"] = Field("confluent", description="Kafka client library")
    config: dict[str, str | int | float | bool] = Field(
        default_factory=dict,
        description="client settings for the external cluster (security.protocol, sasl.*, ...)",
    )
    group_id: str | None = Field(
        None, description="consumer group on the external cluster; default streamflow.PIPELINE.SOURCE"
    )
    timestamps: Literal["original", "copying"] = Field(
        "original", description="the copies' timestamps: their records' own (original), or the "
        "time of copying (copying), so that Kafka's retention never deletes a fresh copy of an "
        "old record",
    )

    @field_validator("bootstrap")
    @classmethod
    def _check_bootstrap(cls, value: str) -> str:
        if value == "embedded" or not re.fullmatch(r"[^\s:,]+:\d{1,5}(,\s*[^\s:,]+:\d{1,5})*", value):
            raise ValueError(f"{value!r} is not host:port[,host:port...] of the external cluster")
        return value

    def client_settings(self) -> dict[str, str]:
        return KafkaConfig(bootstrap=self.bootstrap, config=self.config).client_settings()


def _partition_name(partition: TopicPartition) -> str:
    return f"{partition[0]}:{partition[1]}"


class KafkaSource(Source[KafkaSourceConfig]):
    """Consumes the external topics and re-emits every record past the checkpointed offsets."""

    config_model = KafkaSourceConfig

    def __init__(self, config: KafkaSourceConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.group_id = config.group_id or f"streamflow.{context.pipeline}.{context.name}"
        self._next: dict[str, int] = {}
        self._consumer: Consumer | None = None

    def open(self, position: dict[str, int] | None) -> None:
        self._next = dict(position or {})
        transport = create_transport(self.config.client, self.config.bootstrap,
                                     self.config.client_settings())
        admin = transport.admin()
        try:
            found = admin.describe_topics(self.config.topics)
        except TransportError as exc:
            raise TransientError(
                f"the external Kafka cluster at {self.config.bootstrap} is unreachable: {exc}"
            ) from None
        finally:
            admin.close()
        missing = sorted(set(self.config.topics) - set(found))
        if missing:
            raise ValueError(f"topics {', '.join(missing)} do not exist on the external Kafka "
                             f"cluster at {self.config.bootstrap}")
        self._consumer = transport.consumer(self.group_id, self.config.topics)

    def poll(self, max_records: int, timeout_s: float) -> SourceBatch:
        assert self._consumer is not None, "open() first"
        consumed = self._consumer.consume_batch(max_records, timeout_s)
        batch = SourceBatch([])
        keep_timestamps = self.config.timestamps == "original"
        for index in range(len(consumed)):
            name = _partition_name((consumed.topics[index], consumed.partitions[index]))
            offset = consumed.offsets[index]
            if offset < self._next.get(name, 0):
                continue  # copied before the restart
            batch.values.append(consumed.values[index])  # type: ignore[arg-type]  # tombstones too
            batch.keys.append(consumed.keys[index])
            if keep_timestamps:  # else none: the producer stamps each copy as it sends it
                batch.timestamps_ms.append(consumed.timestamps_ms[index])
            self._next[name] = offset + 1
        return batch

    def position(self) -> dict[str, int]:
        return dict(self._next)

    def acknowledged(self, position: dict[str, int]) -> None:
        offsets: dict[TopicPartition, int] = {}
        for name, offset in position.items():
            topic, partition = name.rsplit(":", 1)
            offsets[(topic, int(partition))] = offset
        try:
            assert self._consumer is not None
            self._consumer.commit(offsets, asynchronous=True)
        except TransportError as exc:  # advisory only: the checkpoint is already durable
            log.debug("kafka source %s: committing to %s failed: %s", self.context.name,
                      self.group_id, exc)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
