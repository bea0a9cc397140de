"""Which input fields each output column of a ``sql`` step reads, as DuckDB parses the statement.

DuckDB serializes a statement's parse tree (``json_serialize_sql``); a plain ``SELECT`` over the
step's table ``batch`` tells, for each item of its select list, the columns its expression
references. Other statements (joins, set operations, ``GROUP BY``, subqueries in the select
list, a ``FROM`` of anything but ``batch``) are not derived: their output has no column lineage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

TABLE = "batch"  # the table a sql step reads (streamflow.processing.steps)


@dataclass
class SqlColumns:
    """A ``SELECT``'s output columns: each one's input fields, and which are computed (not a
    plain reference to one field). ``passes_unknown``: a ``*`` also passes fields not listed in
    ``known`` (the input's fields were not all known), unchanged."""

    inputs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    computed: set[str] = field(default_factory=set)
    passes_unknown: bool = False
    excluded: set[str] = field(default_factory=set)  # by ``* EXCLUDE``


def sql_columns(query: str, known: Sequence[str] | None) -> SqlColumns | None:
    """The output columns of ``query`` over ``batch``, whose fields are ``known`` (None: not
    known, so a ``*`` passes the input as it is); None when it is not one plain SELECT over
    ``batch``, or an output column's name is not known (an expression without an alias)."""
    import duckdb  # 20 MB, for processes whose stages run SQL

    try:
        serialized = json.loads(duckdb.connect().execute(
            "SELECT json_serialize_sql(?::VARCHAR)", [query]).fetchone()[0])
    except (duckdb.Error, TypeError, ValueError):
        return None
    statements = serialized.get("statements") or []
    if serialized.get("error") or len(statements) != 1:
        return None
    node = statements[0].get("node") or {}
    source = node.get("from_table") or {}
    if (node.get("type") != "SELECT_NODE" or node.get("group_expressions")
            or node.get("cte_map", {}).get("map") or source.get("type") != "BASE_TABLE"
            or source.get("table_name", "").lower() != TABLE):
        return None
    if '"SUBQUERY"' in json.dumps(node.get("select_list")):
        return None  # its columns are another table's
    columns = SqlColumns()
    for item in node.get("select_list") or []:
        if item.get("class") == "STAR":
            if not _expand_star(item, known, columns):
                return None
            continue
        refs = tuple(dict.fromkeys(_references(item)))
        name = item.get("alias") or (refs[0] if item.get("class") == "COLUMN_REF" else None)
        if not name:
            return None
        columns.inputs[name] = refs
        if item.get("class") == "COLUMN_REF":
            columns.computed.discard(name)
        else:
            columns.computed.add(name)
    return columns


def _expand_star(item: dict[str, Any], known: Sequence[str] | None, columns: SqlColumns) -> bool:
    """Add what ``*`` (``EXCLUDE``, ``REPLACE``) selects; False for forms not derived here."""
    if (item.get("relation_name") not in ("", TABLE) or item.get("columns") or item.get("expr")
            or item.get("rename_list")):
        return False
    excluded = {_last(name) for name in [*(item.get("exclude_list") or []),
                                         *(item.get("qualified_exclude_list") or [])]}
    replaced = {entry["key"]: entry["value"] for entry in item.get("replace_list") or []}
    columns.excluded |= excluded
    if known is None:
        columns.passes_unknown = True
        names: list[str] = []
    else:
        names = [name for name in known if name not in excluded]
    for name in names:
        columns.inputs[name] = (name,)
    for name, expression in replaced.items():
        columns.inputs[name] = tuple(dict.fromkeys(_references(expression)))
        columns.computed.add(name)
    return True


def _last(name: Any) -> str:
    """A column name as the parse tree gives it: a string, or a qualified name's column."""
    return str(name.get("column", "")) if isinstance(name, dict) else str(name)


def _references(expression: Any) -> Iterator[str]:
    """The column names an expression's parse tree references, in order."""
    if isinstance(expression, dict):
        if expression.get("class") == "COLUMN_REF":
            yield str(expression["column_names"][-1])
            return
        for value in expression.values():
            yield from _references(value)
    elif isinstance(expression, list):
        for value in expression:
            yield from _references(value)
