"""User functions for ``python`` steps in tests, referenced as ``tests.step_functions:name``."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


def double_x(record: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]] | None:
    """x doubled; drops records with x == 0, splits records with a list in ``parts``, and fails
    records whose x is not a number."""
    if record.get("x") == 0:
        return None
    if isinstance(record.get("parts"), list):
        return [{"x": record["x"], "part": part} for part in record["parts"]]
    return {**record, "x": record["x"] * 2}


def add_one_batch(table: pa.Table) -> pa.Table:
    """x + 1 for the whole batch (keeps ``_sf_row``)."""
    return table.set_column(table.schema.get_field_index("x"), "x", pc.add(table["x"], 1))


def not_a_table(table: pa.Table) -> str:
    return "oops"
