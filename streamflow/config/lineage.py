"""The ``lineage:`` block: OpenLineage run events for each source, stage and sink (docs/lineage.md)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileLineageTransport(_Strict):
    """Events appended to one file, one JSON document a line."""

    type: Literal["file"]
    path: str = Field(min_length=1, description="file the events are appended to")


class HttpLineageTransport(_Strict):
    """Events POSTed to an OpenLineage HTTP endpoint (Marquez, ...)."""

    type: Literal["http"]
    url: str = Field(min_length=1, description="base URL, e.g. http://marquez:5000")
    endpoint: str = Field("api/v1/lineage", description="path under url")
    timeout_s: float = Field(5.0, gt=0, le=60, description="per request")
    api_key: str | None = Field(None, description="sent as a Bearer token (use ${VAR})")


class KafkaLineageTransport(_Strict):
    """Events produced as JSON to a Kafka topic."""

    type: Literal["kafka"]
    topic: str = Field(min_length=1)
    bootstrap: str | None = Field(None, description="host:port[,...]; default: the pipeline's")
    config: dict[str, str] = Field(default_factory=dict, description="librdkafka producer settings")


LineageTransport = Annotated[
    FileLineageTransport | HttpLineageTransport | KafkaLineageTransport,
    Field(discriminator="type"),
]


class LineageConfig(_Strict):
    """Where OpenLineage events go, and how the jobs are named."""

    transport: LineageTransport
    namespace: str | None = Field(None, min_length=1, description="job namespace; default: the pipeline name")
    running_interval_s: float = Field(60.0, gt=0, description="how often a RUNNING event is sent")
