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


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _utf8_bytes(column: pa.ChunkedArray) -> list[np.ndarray]:
    """The UTF-8 bytes of each chunk of a string column, as views of its data buffers."""
    pieces = []
    for chunk in column.chunks:
        _validity, offsets, data = chunk.buffers()
        if not len(chunk) or data is None:
            continue
        width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
        start, end = np.frombuffer(offsets, width)[[chunk.offset, chunk.offset + len(chunk)]]
        pieces.append(np.frombuffer(data, np.uint8, count=int(end - start), offset=int(start)))
    return pieces


def _escaped(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """The values of a string column escaped for JSON, without their quotes; nulls stay null.

    A byte scan decides which escapes are needed (in UTF-8, bytes below 0x80 are only ever
    themselves), so the common text without quotes, backslashes or control characters is used
    as it is.
    """
    pieces = _utf8_bytes(column)
    if any((piece < 0x20).any() for piece in pieces):  # control characters: json.dumps
        return pa.chunked_array([pa.array(
            [json.dumps(value, ensure_ascii=False)[1:-1] if value is not None else None
             for value in column.to_pylist()], pa.string())])
    if any((piece == ord("\\")).any() for piece in pieces):
        column = pc.replace_substring(column, "\\", "\\\\")
    if any((piece == ord('"')).any() for piece in pieces):
        column = pc.replace_substring(column, '"', '\\"')
    return column


def _json_strings(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """JSON text of each value of a string column (quoted and escaped), nulls as null."""
    return pc.binary_join_element_wise('"', _escaped(column), '"', "")


def _json_floats(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """JSON text of each value of a float column; NaN and infinities become null."""
    finite = pc.if_else(pc.is_finite(column), column, None)
    text = pc.cast(finite, pa.string())
    # Arrow prints 21.0 as "21"; keep a float looking like a float for the next reader. Only
    # whole numbers can lack a "." (or an exponent), so only their text is looked at.
    whole = pc.fill_null(pc.equal(finite, pc.floor(finite)), False)
    if not pc.any(whole).as_py():
        return text
    printed = pc.filter(text, whole)
    fixed = pc.if_else(pc.match_substring_regex(printed, r"[.eE]"), printed,
                       pc.binary_join_element_wise(printed, ".0", ""))
    return pa.chunked_array([pc.replace_with_mask(
        text.combine_chunks(), whole.combine_chunks(), fixed.combine_chunks())])


def _json_values(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """JSON text of each value of a column; nulls stay null (written as ``null`` later)."""
    kind = column.type
    if _is_text(kind):
        return _json_strings(column)
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return pc.cast(column, pa.string())
    if pa.types.is_floating(kind):
        return _json_floats(column)
    if pa.types.is_timestamp(kind):  # "2024-01-01 12:00:00.123Z" → ISO-8601 with a "T"
        return _json_strings(pc.replace_substring(pc.cast(column, pa.string()), " ", "T"))
    return pa.chunked_array([pa.array(
        [json.dumps(value, default=str) if value is not None else None
         for value in column.to_pylist()], pa.string())])


def encode_json(table: pa.Table) -> list[bytes]:
    """One compact JSON object per row, fields in column order (``_sf_row`` left out).

    The constant text between values (braces, field names, commas, and the quotes of text
    columns without nulls) goes into a single element-wise join with the value columns.
    """
    names = [name for name in table.column_names if name != ROW_ID]
    if table.num_rows == 0:
        return []
    if not names:
        return [b"{}"] * table.num_rows
    parts: list[pa.Scalar | pa.ChunkedArray] = []
    literal = "{"
    for index, name in enumerate(names):
        literal += ("," if index else "") + json.dumps(name) + ":"
        column = table.column(name)
        if _is_text(column.type) and not column.null_count:
            parts += [pa.scalar(literal + '"'), _escaped(column)]
            literal = '"'
        else:
            parts += [pa.scalar(literal), pc.fill_null(_json_values(column), "null")]
            literal = ""
    parts.append(pa.scalar(literal + "}"))
    joined = pc.binary_join_element_wise(*parts, "")
    return pc.cast(joined, pa.binary()).to_pylist()
