"""The ``route`` step: choose each record's output topic by SQL predicates."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from streamflow.config.models import Name
from streamflow.plugins import TOPIC_COLUMN, ComponentContext, Processor, StepResult
from streamflow.processing.steps import BatchQuery


class Route(BaseModel):
    """Records matching ``when`` go to ``topic``."""

    model_config = ConfigDict(extra="forbid")

    when: str = Field(min_length=1, description="a DuckDB boolean expression over the record's fields")
    topic: Name


class RouteConfig(BaseModel):
    """Settings of a ``route`` step."""

    model_config = ConfigDict(extra="forbid")

    routes: list[Route] = Field(min_length=1, description="tried in order; the first match wins")
    default: Name | None = Field(
        None, description="topic of records no route matches (default: the stage's output)"
    )

    def topics(self) -> list[str]:
        """Every topic this step can send records to."""
        return [route.topic for route in self.routes] + ([self.default] if self.default else [])


class RouteStep(Processor[RouteConfig]):
    """Tags each record with its topic in the hidden ``_sf_topic`` column, which the stage
    groups its output by; a later ``route`` step re-routes only the records it matches."""

    name = "route"
    config_model = RouteConfig

    @classmethod
    def output_topics(cls, config: RouteConfig) -> list[str]:
        return config.topics()

    def __init__(self, config: RouteConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        cases = " ".join(
            f"WHEN ({route.when}) THEN {index}" for index, route in enumerate(config.routes)
        )
        self.query = BatchQuery(f"SELECT CASE {cases} END AS route FROM batch")
        self.topics = pa.array([route.topic for route in config.routes], pa.string())

    def process(self, table: pa.Table) -> StepResult:
        fitting, failures = self.query.fit(table)
        if failures:  # the rows DuckDB cannot take fail; the others are routed
            keep = np.ones(table.num_rows, dtype=bool)
            keep[[row for row, _error in failures]] = False
            table = table.filter(pa.array(keep))
        choice = self.query.run(fitting.drop_columns(
            [name for name in fitting.column_names if name == TOPIC_COLUMN]
        )).column("route")
        topics = pc.take(self.topics, choice)
        if self.config.default is not None:
            topics = pc.fill_null(topics, self.config.default)
        if TOPIC_COLUMN in table.column_names:
            topics = pc.coalesce(topics, table.column(TOPIC_COLUMN))
            return StepResult(table.set_column(
                table.schema.get_field_index(TOPIC_COLUMN), TOPIC_COLUMN, topics), failures)
        return StepResult(table.append_column(TOPIC_COLUMN, topics), failures)
