"""JSON ↔ Arrow for whole micro-batches.

Decoding hands the batch to pyarrow's NDJSON reader in one call. Only when that fails does it
look at records one by one: ``json.loads`` finds the syntactically bad ones, and bisection with
the Arrow reader finds those whose types do not fit, so good records always get Arrow's exact
semantics and bad ones are reported individually. Encoding builds the JSON text column-wise
with Arrow compute kernels instead of a per-record ``json.dumps``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from streamflow.plugins import ROW_ID

Failures = list[tuple[int, BaseException]]


class DecodeError(ValueError):
    """A record's bytes are not a JSON object of the expected shape."""


def _read(values: Sequence[bytes], schema: pa.Schema | None) -> pa.Table:
    options = (
        pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        if schema is not None
        else pa_json.ParseOptions()
    )
    buffer = b"\n".join(values)
    read_options = pa_json.ReadOptions(use_threads=False, block_size=max(len(buffer) + 1, 1 << 20))
    table = pa_json.read_json(pa.BufferReader(buffer), read_options, options)
    if table.num_rows != len(values):
        raise DecodeError("record boundaries do not match: a value holds more than one document")
    return table


def _with_rows(table: pa.Table, rows: Sequence[int] | np.ndarray) -> pa.Table:
    return table.append_column(ROW_ID, pa.array(np.asarray(rows, dtype=np.int64)))


def decode_json(
    values: Sequence[bytes | None], schema: pa.Schema | None = None, *, lenient: bool = False
) -> tuple[pa.Table, Failures]:
    """Parse JSON objects into a table with a ``_sf_row`` column; bad records become failures.

    With ``schema``, fields outside it are dropped and type mismatches are failures; without
    one, types are inferred. ``lenient`` makes the schema a fast-path hint only: when a batch
    does not fit it (or, without a schema, its records disagree on a field's type), its fields
    are read with their own types (as text where records disagree) for the caller to coerce,
    and only records that are not JSON objects fail.
    """
    if not values:
        empty = schema.empty_table() if schema is not None else pa.table({})
        return _with_rows(empty, []), []
    # Only batches of values that all open an object take the fast path: pyarrow's reader
    # crashes on a leading top-level ``null`` and reads a later one as an all-null record.
    if all(value is not None and value[:1] == b"{" for value in values):
        try:
            return _with_rows(_read(values, schema), range(len(values))), []  # type: ignore[arg-type]
        except (pa.ArrowInvalid, DecodeError):
            pass
    return _decode_slowly(values, schema, lenient)


def _objects(values: Sequence[bytes | None]) -> tuple[dict[int, dict[str, object]], Failures]:
    """The records that are JSON objects, by index, and a failure for each of the others."""
    documents: dict[int, dict[str, object]] = {}
    failures: Failures = []
    for index, value in enumerate(values):
        if not value:
            failures.append((index, DecodeError("empty record value")))
            continue
        try:
            document = json.loads(value)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            failures.append((index, DecodeError(f"invalid JSON: {exc}")))
            continue
        if not isinstance(document, dict):
            kind = type(document).__name__
            failures.append((index, DecodeError(f"expected a JSON object, got {kind}")))
            continue
        documents[index] = document
    return documents, failures


def _as_read(documents: dict[int, dict[str, object]], names: list[str]) -> pa.Table:
    """The ``names`` fields of ``documents`` with their own types, as text where they disagree."""
    columns: dict[str, pa.Array] = {}
    for name in names:
        column = [document.get(name) for document in documents.values()]
        try:
            columns[name] = pa.array(column)
        except (pa.ArrowException, OverflowError):
            columns[name] = pa.array(
                [value if value is None or isinstance(value, str) else json.dumps(value)
                 for value in column], pa.string())
    rows = list(documents)
    table = pa.table(columns) if columns else pa.table({"_": pa.nulls(len(rows))}).drop_columns(["_"])
    return _with_rows(table, rows)


def _decode_slowly(
    values: Sequence[bytes | None], schema: pa.Schema | None, lenient: bool = False
) -> tuple[pa.Table, Failures]:
    documents, failures = _objects(values)
    not_objects = len(failures)
    candidates = list(documents)
    # Raw line breaks can only be insignificant whitespace in valid JSON.
    cleaned = {index: values[index].replace(b"\n", b" ").replace(b"\r", b" ")  # type: ignore[union-attr]
               for index in candidates}

    pieces: list[tuple[list[int], pa.Table]] = []

    def bisect(indices: list[int]) -> None:
        try:
            pieces.append((indices, _read([cleaned[i] for i in indices], schema)))
        except (pa.ArrowInvalid, DecodeError) as exc:
            if len(indices) == 1:
                failures.append((indices[0], DecodeError(str(exc))))
                return
            middle = len(indices) // 2
            bisect(indices[:middle])
            bisect(indices[middle:])

    if candidates:
        bisect(candidates)
    if lenient and schema is not None and len(failures) > not_objects:
        return _as_read(documents, schema.names), failures[:not_objects]
    failures.sort(key=lambda failure: failure[0])
    if not pieces:
        empty = schema.empty_table() if schema is not None else pa.table({})
        return _with_rows(empty, []), failures
    tables = [_with_rows(table, indices) for indices, table in pieces]
    try:
        return pa.concat_tables(tables, promote_options="permissive"), failures
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        if lenient:
            names = list(dict.fromkeys(name for document in documents.values() for name in document))
            return _as_read(documents, names), failures[:not_objects]
        # Inferred types disagree between pieces: keep the first piece's type, fail the rest.
        for indices, _table in pieces[1:]:
            failures.extend((index, DecodeError(f"field types conflict: {exc}")) for index in indices)
        failures.sort(key=lambda failure: failure[0])
        return tables[0], failures


_CONTROL_CHARACTERS = r"[\x00-\x1f]"


def _json_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """JSON text of each value of a string column (quoted and escaped), nulls as null."""
    if pc.any(pc.match_substring_regex(column, _CONTROL_CHARACTERS)).as_py():
        return pa.chunked_array([pa.array(
            [json.dumps(value, ensure_ascii=False) if value is not None else None
             for value in column.to_pylist()], pa.string())])
    escaped = pc.replace_substring(column, "\\", "\\\\")
    escaped = pc.replace_substring(escaped, '"', '\\"')
    return pc.binary_join_element_wise('"', escaped, '"', "")


def _json_values(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """JSON text of each value of a column; nulls stay null (written as ``null`` later)."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return _json_strings(column)
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return pc.cast(column, pa.string())
    if pa.types.is_floating(kind):
        finite = pc.if_else(pc.is_finite(column), column, None)
        text = pc.cast(finite, pa.string())
        # Arrow prints 21.0 as "21"; keep a float looking like a float for the next reader.
        integral = pc.invert(pc.match_substring_regex(text, r"[.eE]"))
        return pc.if_else(integral, pc.binary_join_element_wise(text, ".0", ""), text)
    if pa.types.is_timestamp(kind):  # "2024-01-01 12:00:00.123Z" → ISO-8601 with a "T"
        return _json_strings(pc.replace_substring(pc.cast(column, pa.string()), " ", "T"))
    return pa.chunked_array([pa.array(
        [json.dumps(value, default=str) if value is not None else None
         for value in column.to_pylist()], pa.string())])


def encode_json(table: pa.Table) -> list[bytes]:
    """One compact JSON object per row, fields in column order (``_sf_row`` left out)."""
    names = [name for name in table.column_names if name != ROW_ID]
    if table.num_rows == 0:
        return []
    if not names:
        return [b"{}"] * table.num_rows
    fragments = []
    for index, name in enumerate(names):
        prefix = ("{" if index == 0 else ",") + json.dumps(name) + ":"
        values = pc.fill_null(_json_values(table.column(name)), "null")
        fragments.append(pc.binary_join_element_wise(prefix, values, ""))
    fragments.append(pa.scalar("}"))
    joined = pc.binary_join_element_wise(*fragments, "")
    return pc.cast(joined, pa.binary()).to_pylist()
