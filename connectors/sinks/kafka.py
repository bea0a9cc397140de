"""Another Kafka topic, on the pipeline's own cluster or on another one.

Records are produced as JSON objects (optionally keyed by a field); :meth:`KafkaSink.flush`
returns only once the broker acknowledged every record, and the runtime commits the input
offsets after that: at-least-once (a crash between the two produces a record again).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from connectors.sinks.warehouse import apart_from_lineage, is_nested, json_text
from streamflow.config.models import KafkaConfig
from streamflow.plugins import ComponentContext, Sink
from streamflow.processing.codec import encode_json
from streamflow.transport import OutgoingBatch, Producer, TopicSpec, Transport, create_transport
from streamflow.transport.base import TopicPartition


class KafkaSinkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topic: str = Field(min_length=1, description="topic to produce to (created if missing)")
    partitions: int = Field(1, ge=1, description="partitions of the topic when it is created")
    key_field: str | None = Field(None, description="field whose value becomes the record key")
    cluster: KafkaConfig | None = Field(
        None, description="another cluster (bootstrap, client, config); default: the pipeline's"
    )

    @field_validator("cluster")
    @classmethod
    def _not_embedded(cls, cluster: KafkaConfig | None) -> KafkaConfig | None:
        if cluster is not None and cluster.bootstrap == "embedded":
            raise ValueError("cluster.bootstrap must be host:port; leave cluster out to produce "
                             "to the pipeline's own cluster")
        return cluster


class KafkaSink(Sink[KafkaSinkConfig]):
    """Produces records as JSON to another topic, on this cluster or another (at least once).

    Buffers encoded records; :meth:`flush` produces them and waits for acknowledgement.
    """

    config_model = KafkaSinkConfig

    def __init__(self, config: KafkaSinkConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.producer: Producer | None = None
        self._buffer: list[OutgoingBatch] = []

    def _transport(self) -> Transport:
        cluster = self.config.cluster
        if cluster is not None:
            return create_transport(cluster.client, cluster.bootstrap, cluster.client_settings())
        if self.context.transport is None:
            raise ValueError("the kafka sink runs outside a pipeline: set cluster.bootstrap")
        return self.context.transport

    def open(self) -> None:
        transport = self._transport()
        admin = transport.admin()
        try:
            admin.create_topics([TopicSpec(self.config.topic, self.config.partitions)])
        finally:
            admin.close()
        self.producer = transport.producer()

    def _keys(self, table: pa.Table) -> list[Any]:
        field = self.config.key_field
        if field is None or field not in table.column_names:
            return []
        column = table.column(field)
        text = json_text(column) if is_nested(column.type) else pc.cast(column, pa.string())
        return [None if key is None else key.encode() for key in text.to_pylist()]

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        table = apart_from_lineage(table)
        self._buffer.append(OutgoingBatch(self.config.topic, encode_json(table), self._keys(table)))

    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> int:
        assert self.producer is not None
        self.producer.produce(self._buffer)
        written = sum(len(value) for batch in self._buffer for value in batch.values)
        self._buffer.clear()
        return written

    def close(self) -> None:
        self._buffer.clear()  # unflushed records are replayed from the input
        if self.producer is not None:
            self.producer.close()
            self.producer = None
