"""Prints records as JSON lines, for debugging a pipeline (``streamflow run`` shows them)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import BinaryIO, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from connectors.sinks.warehouse import apart_from_lineage
from streamflow.plugins import ComponentContext, Sink
from streamflow.processing.codec import encode_json
from streamflow.transport.base import TopicPartition


class ConsoleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stream: Literal["stdout", "stderr"] = Field("stdout", description="where the lines go")


class ConsoleSink(Sink[ConsoleConfig]):
    """Prints records as JSON lines, for debugging.

    Lines are written as records arrive and flushed with each checkpoint.
    """

    config_model = ConsoleConfig

    def __init__(self, config: ConsoleConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self.output: BinaryIO = getattr(sys, config.stream).buffer
        self._written = 0

    def write(self, table: pa.Table, partition: TopicPartition, first_offset: int) -> None:
        lines = encode_json(apart_from_lineage(table))
        if lines:
            self._written += self.output.write(b"\n".join(lines) + b"\n")

    def flush(self, offsets: Mapping[TopicPartition, int], cluster_id: str) -> int:
        self.output.flush()
        written, self._written = self._written, 0
        return written
