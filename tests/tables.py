"""Building step inputs in tests: a table with its ``_sf_row`` ids, and steps by kind."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from streamflow.config.loader import step_settings
from streamflow.config.models import StepConfig
from streamflow.plugins import ROW_ID, ComponentContext, Processor

CONTEXT = ComponentContext("p", "s")


def with_rows(data: dict[str, list[Any]] | pa.Table, rows: list[int] | None = None) -> pa.Table:
    table = data if isinstance(data, pa.Table) else pa.table(data)
    return table.append_column(ROW_ID, pa.array(rows or list(range(table.num_rows)), pa.int64()))


def step(kind: str, settings: Any) -> Processor[Any]:
    """The registered step ``kind`` with ``settings``, validated as a pipeline file's would be."""
    plugin, validated = step_settings(StepConfig.model_validate({kind: settings}))
    return plugin(validated, CONTEXT)  # type: ignore[no-any-return]
