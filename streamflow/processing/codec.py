"""JSON ↔ Arrow for whole micro-batches.

A small batch (up to :data:`SMALL_READ` records) of plain records (see :func:`_read_plain`) is
read record by record with exactly the reader's result: pyarrow's reader starts a thread for
each call, which costs more than such a batch's parsing on a busy machine. Otherwise decoding
hands the batch to pyarrow's NDJSON reader in one call, once cheap checks showed that
the batch is UTF-8 and that no record nests deeper than :data:`MAX_DEPTH` (deeper nesting
overflows the parser's stack). Only when that fails does it look at records one by one: a
record that is not UTF-8, nests too deep, is not a JSON object, holds a number too large for
a double or an unpaired surrogate fails on its own, and bisection with the Arrow reader finds
those it does not read (types that do not fit, a field name read twice), so good records
always get Arrow's exact semantics and bad ones are reported individually. Every record ends
up exactly once either in the table (by its ``_sf_row``) or in the failures.

The runtime's own columns start with ``_sf_``: a record field whose name starts with ``_sf_``
(or with the escape ``_sf~``) is renamed on decoding by prefixing ``_sf~`` (``_sf_row`` becomes
``_sf~_sf_row``) and gets its name back in :func:`user_fields`, so data never collides with
or steers the runtime.

Encoding builds the JSON text column-wise with Arrow compute kernels instead of a per-record
``json.dumps``; a small batch (up to :data:`SMALL_WRITE` records) of text, integer, boolean and
double columns is written value by value in Python instead, to the same bytes (the kernel calls
cost more than such a batch).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from json.encoder import encode_basestring
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from streamflow.plugins import ROW_ID
from streamflow.processing.schema_memo import PerSchema
from streamflow.processing.steps import HIDDEN_PREFIX

Failures = list[tuple[int, BaseException]]

MAX_DEPTH = 128  # nested arrays and objects in a record (as serde_json's default limit)
# Batches of up to this many records are read, and written, value by value where they can be
# (see _read_plain and _write_plain): about where Arrow's fixed cost per call stops dominating,
# timed in a stage's loop of decode, steps and encode (in a loop of one call alone, Arrow's code
# stays in the CPU's caches and seems cheaper than it is there).
SMALL_READ = 96
SMALL_WRITE = 128
ESCAPE = "_sf~"  # prefixed to record fields named like the runtime's columns

_NOT_OPENING = bytes(byte for byte in range(256) if byte not in b"[{\n")
# A JSON string, or an unterminated one up to the end: always matches at a quote, so removing
# the strings of a text takes one pass.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)


class DecodeError(ValueError):
    """A record's bytes are not a JSON object of the expected shape."""


def escape_name(name: str) -> str:
    """The column name of a record field: ``_sf~`` prefixed when it starts with ``_sf_`` or ``_sf~``."""
    return ESCAPE + name if name.startswith((HIDDEN_PREFIX, ESCAPE)) else name


def _user_name(name: str) -> str:
    return name.removeprefix(ESCAPE)


def with_row_ids(table: pa.Table, rows: Sequence[int] | np.ndarray) -> pa.Table:
    """Decoded records with their ``_sf_row`` ids, their fields named by :func:`escape_name`."""
    names = table.schema.names
    escaped = [escape_name(name) for name in names]
    if escaped != names:
        table = table.rename_columns(escaped)
    return table.append_column(ROW_ID, pa.array(np.asarray(rows, dtype=np.int64)))


def user_fields(table: pa.Table) -> pa.Table:
    """The records' own fields: without ``_sf_row``, with the names :func:`escape_name` changed
    restored."""
    names = table.schema.names
    if ROW_ID in names:
        table = table.drop_columns([ROW_ID])
        names = table.schema.names
    restored = [_user_name(name) for name in names]
    return table if restored == names else table.rename_columns(restored)


def _read(values: Sequence[bytes], schema: pa.Schema | None, buffer: bytes | None = None) -> pa.Table:
    """The values as a table by the Arrow reader (``buffer``: the values joined by line breaks)."""
    options = (
        pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        if schema is not None
        else pa_json.ParseOptions()
    )
    buffer = b"\n".join(values) if buffer is None else buffer
    read_options = pa_json.ReadOptions(use_threads=False, block_size=max(len(buffer) + 1, 1 << 20))
    table = pa_json.read_json(pa.BufferReader(buffer), read_options, options)
    try:
        table.validate()
    except pa.ArrowInvalid:
        # pyarrow infers a list of two or more nulls with too short a child array (to_pylist
        # then fails); read as lists of text, such values come out right.
        if schema is not None:
            raise
        typed = pa.schema([field.with_type(_null_items_as_text(field.type)) for field in table.schema])
        options = pa_json.ParseOptions(explicit_schema=typed, unexpected_field_behavior="infer")
        table = pa_json.read_json(pa.BufferReader(buffer), read_options, options)
        table.validate()
    if table.num_rows != len(values):
        raise DecodeError("record boundaries do not match: a value holds more than one document")
    return table


def _read_plain(values: Sequence[bytes], schema: pa.Schema, buffer: bytes) -> pa.Table | None:
    """The values read into ``schema`` by ``json.loads``, exactly as :func:`_read` reads them,
    if they are plain; otherwise None. Plain: ``buffer`` (the values joined by line breaks) is
    ASCII without ``\\u`` escapes, line breaks of its own or numbers that might be too large
    for a double; no object names a field twice; the declared types are text, integer, double
    or boolean; and each declared field is null, absent or of its type's own JSON kind: numbers
    for doubles (integers only when exact in a double, and zero only where no ``-0`` could be),
    integers within 64 bits."""
    if (not buffer.isascii() or b"\\u" in buffer or buffer.count(b"\n") != len(values) - 1
            or _maybe_too_large(buffer)):
        return None
    documents = _documents(values, buffer.decode())
    if documents is None:
        return None
    signed_zero = b"-0" in buffer  # once a batch, not once a zero
    columns = []
    for name, kind, plain in _PLAIN_FIELDS(schema):
        column = [document.get(name) for document in documents]
        if plain is None or not plain(column, signed_zero):
            return None
        columns.append(pa.array(column, kind))
    return pa.Table.from_arrays(columns, schema=schema)


def _documents(values: Sequence[bytes], text: str) -> list[dict[str, Any]] | None:
    """Each of ``values`` (objects, joined by line breaks into ``text``) parsed on its own by
    ``json``, in place in ``text``; None when one is not exactly one valid object."""
    documents = []
    start = 0
    try:
        for value in values:
            document, end = _PLAIN_DECODER.raw_decode(text, start)
            start += len(value)
            if end != start:  # spaces or more after the object: the Arrow reader's case
                return None
            documents.append(document)
            start += 1  # the line break
    except (ValueError, RecursionError):
        return None
    return documents


def _fields_once(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object that names no field twice (the Arrow reader refuses one that does)."""
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("a field named twice")
    return document


_PLAIN_DECODER = json.JSONDecoder(object_pairs_hook=_fields_once)
_EXACT_IN_DOUBLE = 2**53
_DIGITS_AS_ZEROS = bytes.maketrans(b"123456789.", b"0" * 10)


def _maybe_too_large(buffer: bytes) -> bool:
    """Whether a number in ``buffer`` has an exponent or 309 digits, so might be too large for
    a double: the Arrow reader refuses such a number, where json.loads takes it as infinity
    (text that only looks like one costs the Arrow reader's call, nothing more)."""
    shape = buffer.translate(_DIGITS_AS_ZEROS)
    return b"0e" in shape or b"0E" in shape or b"0" * 309 in shape


# Whether a column's values, as json.loads gave them, are plain for an Arrow type (see
# _read_plain). The set of their Python types tells, at C speed, for all but integer doubles.
_TEXT = frozenset([str, type(None)])
_BOOLEANS = frozenset([bool, type(None)])
_INTEGERS = frozenset([int, type(None)])
_FLOATS = frozenset([float, type(None)])
_NUMBERS = _FLOATS | _INTEGERS


def _plain_integers(values: list[Any], _signed_zero: bool) -> bool:
    kinds = set(map(type, values))
    if not kinds <= _INTEGERS:
        return False
    numbers = [value for value in values if value is not None] if type(None) in kinds else values
    return not numbers or (min(numbers) >= -(2**63) and max(numbers) < 2**63)


def _plain_doubles(values: list[Any], signed_zero: bool) -> bool:
    """``signed_zero``: the batch's text holds ``-0``, which the reader reads with its sign and
    json.loads as the integer 0. Integers are plain only where exact in a double."""
    kinds = set(map(type, values))
    if kinds <= _FLOATS:
        return True
    return kinds <= _NUMBERS and all(
        type(value) is not int or 0 < abs(value) <= _EXACT_IN_DOUBLE or (value == 0 and not signed_zero)
        for value in values)


_PLAIN_KINDS: dict[pa.DataType, Callable[[list[Any], bool], bool]] = {
    pa.string(): lambda values, _signed_zero: set(map(type, values)) <= _TEXT,
    pa.int64(): _plain_integers,
    pa.float64(): _plain_doubles,
    pa.bool_(): lambda values, _signed_zero: set(map(type, values)) <= _BOOLEANS,
}


# Each field of a schema with its type's check (None for a type never plain), derived once.
_PLAIN_FIELDS = PerSchema(lambda schema: [(name, kind, _PLAIN_KINDS.get(kind))
                                          for name, kind in zip(schema.names, schema.types, strict=True)])


def _null_items_as_text(kind: pa.DataType, in_list: bool = False) -> pa.DataType:
    if pa.types.is_null(kind) and in_list:
        return pa.string()
    if pa.types.is_list(kind):
        return pa.list_(_null_items_as_text(kind.value_type, True))
    if pa.types.is_struct(kind):
        return pa.struct([field.with_type(_null_items_as_text(field.type, in_list)) for field in kind])
    return kind


def _depth(value: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (for invalid JSON, at least as deep
    as a parser gets before the error)."""
    structure = np.frombuffer(_STRING.sub(b"", value), np.uint8) | 0x20  # "[" → "{", "]" → "}"
    steps = (structure == ord("{")).astype(np.int64) - (structure == ord("}"))
    return int(np.cumsum(steps).max(initial=0))


def _too_deep(value: bytes) -> bool:
    return value.count(b"[") + value.count(b"{") > MAX_DEPTH and _depth(value) > MAX_DEPTH


def _fits_reader(values: Sequence[bytes], buffer: bytes) -> bool:
    """Whether the Arrow reader may see ``buffer``, the values joined by line breaks: it does not
    check UTF-8, and its parser recurses (10,000 nested arrays overflow the stack). Counting the
    opening brackets, of the whole buffer and then of each line, clears nearly every batch
    without looking at its records."""
    if not buffer.isascii():
        offsets = pa.py_buffer(np.array([0, len(buffer)], np.int64))
        text = pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(buffer)])
        try:
            text.cast(pa.large_string())
        except pa.ArrowInvalid:
            return False
    if buffer.count(b"[") + buffer.count(b"{") <= MAX_DEPTH:
        return True
    opening = np.frombuffer(buffer.translate(None, _NOT_OPENING), np.uint8)  # and line breaks
    line_ends = np.flatnonzero(opening == ord("\n"))
    if np.diff(line_ends, prepend=-1, append=len(opening)).max() <= MAX_DEPTH + 1:
        return True
    return not any(map(_too_deep, values))


def decode_json(
    values: Sequence[bytes | None], schema: pa.Schema | None = None, *, lenient: bool = False
) -> tuple[pa.Table, Failures]:
    """Parse JSON objects into a table with a ``_sf_row`` column; bad records become failures.

    With ``schema``, fields outside it are dropped and type mismatches are failures; without
    one, types are inferred: where records disagree on a field's kind (text, number, boolean,
    list, object), the kind most of them hold wins (the earliest on a tie). ``lenient``
    makes the schema a fast-path hint only: when a batch does not fit it (or, without a schema,
    its records disagree on a field's type), its fields are read with their own types (as text
    where records disagree) for the caller to coerce, and only records that are not valid JSON
    objects fail (a repeated field name keeps its last value). Whether a record fails never
    depends on the other records of the batch, but for type conflicts without ``lenient``:
    then the records in the minority fail, never those beside them.
    """
    if not values:
        empty = schema.empty_table() if schema is not None else pa.table({})
        return with_row_ids(empty, []), []
    # Only batches of values that all open an object take the fast path: pyarrow's reader
    # crashes on a leading top-level ``null`` and reads a later one as an all-null record.
    if all(value is not None and value[:1] == b"{" for value in values):
        objects = cast(Sequence[bytes], values)
        buffer = b"\n".join(objects)
        if _fits_reader(objects, buffer):
            plain = (_read_plain(objects, schema, buffer)
                     if schema is not None and len(objects) <= SMALL_READ else None)
            if plain is not None:
                return with_row_ids(plain, range(len(objects))), []
            try:
                table = _read(objects, schema, buffer)
            except (pa.ArrowInvalid, DecodeError):
                pass
            else:
                # The reader takes a number just over the largest double (2e308) as infinity,
                # where it refuses 1e400: the record by record path tells them from Infinity.
                if not any(map(_has_infinity, table.columns)):
                    return with_row_ids(table, range(len(objects))), []
    return _decode_slowly(values, schema, lenient)


def _has_infinity(column: pa.ChunkedArray | pa.Array) -> bool:
    """Whether a float anywhere in ``column`` (in lists and structs too) is infinite."""
    kind = column.type
    if pa.types.is_floating(kind):
        return bool(pc.any(pc.is_inf(column)).as_py())
    if pa.types.is_struct(kind):
        return any(_has_infinity(pc.struct_field(column, [index])) for index in range(kind.num_fields))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _has_infinity(pc.list_flatten(column))
    return False


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise DecodeError(f"number {text[:40]} is too large for a double")
    return number


def _document(value: bytes | None) -> dict[str, object]:
    """The JSON object of one record value; a DecodeError says why there is none."""
    if not value:
        raise DecodeError("empty record value")
    if _too_deep(value):
        raise DecodeError(f"nesting deeper than {MAX_DEPTH} arrays and objects")
    try:
        text = value.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"not UTF-8: {exc}") from None
    try:
        document = json.loads(text, parse_float=_finite_float)
    except ValueError as exc:
        raise DecodeError(f"invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise DecodeError(f"expected a JSON object, got {type(document).__name__}")
    if "\\u" in text:  # only an escape can make an unpaired surrogate
        try:
            json.dumps(document, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise DecodeError("a string holds an unpaired surrogate (\\ud800-\\udfff)") from None
    return document


def _objects(values: Sequence[bytes | None]) -> tuple[dict[int, dict[str, object]], Failures]:
    """The records that are JSON objects, by index, and a failure for each of the others."""
    documents: dict[int, dict[str, object]] = {}
    failures: Failures = []
    for index, value in enumerate(values):
        try:
            documents[index] = _document(value)
        except DecodeError as exc:
            failures.append((index, exc))
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
    return with_row_ids(table, rows)


def _kind(value: object) -> str:
    """A JSON value's kind, as far as Arrow's type inference tells them apart."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def _majority_first(documents: dict[int, dict[str, object]]) -> list[int]:
    """The indices of ``documents``: first those whose every field has the kind most records
    give it (the earliest such kind on a tie), then the others, each part in input order."""
    kinds: dict[str, Counter[str]] = {}
    for document in documents.values():
        for name, value in document.items():
            if value is not None:
                kinds.setdefault(name, Counter())[_kind(value)] += 1
    disputed = {name: counts.most_common(1)[0][0]
                for name, counts in kinds.items() if len(counts) > 1}
    if not disputed:
        return list(documents)
    dissenting = {index for index, document in documents.items()
                  if any(document.get(name) is not None and _kind(document[name]) != kind
                         for name, kind in disputed.items())}
    return ([index for index in documents if index not in dissenting]
            + [index for index in documents if index in dissenting])


def _decode_slowly(
    values: Sequence[bytes | None], schema: pa.Schema | None, lenient: bool = False
) -> tuple[pa.Table, Failures]:
    """Record by record: the valid objects read by bisection, each joining the table unless it
    does not read or its types conflict with the records before it, which hold the kinds most
    records give their fields (see :func:`_majority_first`)."""
    documents, failures = _objects(values)
    # Raw line breaks can only be insignificant whitespace in valid JSON.
    cleaned = {index: values[index].replace(b"\n", b" ").replace(b"\r", b" ")  # type: ignore[union-attr]
               for index in documents}
    # The tables read so far, whose schemas unify; merged once at the end, since merging each
    # into the one before copies it again every time (quadratic in a batch of many conflicts).
    # Should that merge refuse a cast the schemas allowed, the pieces are merged one by one.
    pieces: list[pa.Table] = []
    unified: list[pa.Schema] = []
    unfit: Failures = []
    one_by_one = False

    def split(indices: list[int], error: DecodeError) -> None:
        if len(indices) == 1:
            unfit.append((indices[0], error))
            return
        middle = len(indices) // 2
        place(indices[:middle])
        place(indices[middle:])

    def place(indices: list[int]) -> None:
        try:
            table = with_row_ids(_read([cleaned[i] for i in indices], schema), indices)
        except (pa.ArrowInvalid, DecodeError) as exc:
            split(indices, DecodeError(str(exc)))
            return
        if pieces:
            try:
                if one_by_one:
                    table = pa.concat_tables([pieces[0], table], promote_options="permissive")
                else:
                    unified[:] = [pa.unify_schemas([unified[0], table.schema], promote_options="permissive")]
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                split(indices, DecodeError(f"field types conflict: {exc}"))
                return
        elif not one_by_one:
            unified[:] = [table.schema]
        pieces[:] = [table] if one_by_one else [*pieces, table]

    merged: list[pa.Table] = []
    if documents:
        order = _majority_first(documents)
        place(order)
        try:
            merged = [pa.concat_tables(pieces, promote_options="permissive")] if pieces else []
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            one_by_one, pieces, unified, unfit = True, [], [], []
            place(order)
            merged = pieces
        if merged and order != list(documents):
            merged = [merged[0].sort_by(ROW_ID)]
    if lenient and unfit:
        names = schema.names if schema is not None else list(
            dict.fromkeys(name for document in documents.values() for name in document))
        return _as_read(documents, names), failures
    failures = sorted(failures + unfit, key=lambda failure: failure[0])
    if not merged:
        empty = schema.empty_table() if schema is not None else pa.table({})
        return with_row_ids(empty, []), failures
    return merged[0], failures


def _utf8_bytes(column: pa.ChunkedArray) -> list[np.ndarray]:
    """The UTF-8 bytes of each chunk of a string column, as views of its data buffers."""
    pieces = []
    for chunk in column.chunks:
        _validity, offsets, data = chunk.buffers()
        if not len(chunk) or data is None:
            continue
        start, end = np.frombuffer(offsets, np.int32)[[chunk.offset, chunk.offset + len(chunk)]]
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
    if pa.types.is_string(kind):
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


def _json_float_columns(table: pa.Table) -> dict[int, pa.ChunkedArray]:
    """JSON text of the float columns (by position), those of one type formatted together: the
    dozen kernel calls :func:`_json_floats` makes are then a batch's, not a column's."""
    by_type: dict[pa.DataType, list[int]] = {}
    for index, field in enumerate(table.schema):
        if pa.types.is_floating(field.type):
            by_type.setdefault(field.type, []).append(index)
    texts = {}
    for kind, indices in by_type.items():
        together = pa.chunked_array(
            [chunk for index in indices for chunk in table.column(index).chunks], kind)
        text = _json_floats(together)
        for position, index in enumerate(indices):
            texts[index] = text.slice(position * table.num_rows, table.num_rows)
    return texts


def encode_json(table: pa.Table) -> list[bytes]:
    """One compact JSON object per row, every column a field in column order (a stage's rows
    go through :func:`user_fields` first).

    The constant text between values (braces, field names, commas, and the quotes of text
    columns without nulls) goes into a single element-wise join with the value columns.
    """
    names = table.schema.names
    if table.num_rows == 0:
        return []
    if not names:
        return [b"{}"] * table.num_rows
    for index, kind in enumerate(table.schema.types):  # one text type for the kernels' joins
        if pa.types.is_large_string(kind):
            table = table.set_column(index, names[index], pc.cast(table.column(index), pa.string()))
    if table.num_rows <= SMALL_WRITE and (written := _write_plain(table)) is not None:
        return written
    floats = _json_float_columns(table)
    parts: list[pa.Scalar | pa.ChunkedArray] = []
    literal = "{"
    for index, name in enumerate(names):
        literal += ("," if index else "") + json.dumps(name) + ":"
        column = table.column(index)
        if pa.types.is_string(column.type) and not column.null_count:
            parts += [pa.scalar(literal + '"'), _escaped(column)]
            literal = '"'
        else:
            text = floats[index] if index in floats else _json_values(column)
            parts += [pa.scalar(literal), pc.fill_null(text, "null")]
            literal = ""
    parts.append(pa.scalar(literal + "}"))
    joined = pc.binary_join_element_wise(*parts, "")
    return pc.cast(joined, pa.binary()).to_pylist()


def _write_plain(table: pa.Table) -> list[bytes] | None:
    """What :func:`encode_json` writes for ``table``, value by value in Python, when its columns
    are all text, integers, booleans or doubles; otherwise None."""
    found = _ROW_WRITERS(table.schema)
    if found is None:
        return None
    template, writers = found
    # A record batch's arrays give their values faster than a table's chunked arrays.
    batches = table.to_batches()
    columns = (batches[0] if len(batches) == 1 else table.combine_chunks().to_batches()[0]).columns
    texts = [[_NULL if value is None else write(value) for value in column.to_pylist()]
             if column.null_count else list(map(write, column.to_pylist()))
             for write, column in zip(writers, columns, strict=True)]
    return [(template % row).encode() for row in zip(*texts, strict=True)]


def _row_writer(schema: pa.Schema) -> tuple[str, list[Callable[[Any], str]]] | None:
    """For :func:`_write_plain`: a row's JSON text as a ``%`` template, a ``%s`` for each value,
    and each column's writer; None when a column has none."""
    writers = [_PLAIN_WRITERS.get(kind.id) for kind in schema.types]
    if any(writer is None for writer in writers):
        return None
    fields = [json.dumps(name).replace("%", "%%") + ":%s" for name in schema.names]
    return "{" + ",".join(fields) + "}", cast(list[Callable[[Any], str]], writers)


_ROW_WRITERS = PerSchema(_row_writer)
_NULL = "null"


def _double_json(value: float) -> str:
    """A double as :func:`_json_floats` writes it: Arrow's shortest text (in exponent form from
    1e10 on and below 1e-6), with ``.0`` after a whole number written without an exponent;
    ``null`` for NaN and infinities."""
    if not math.isfinite(value):
        return _NULL
    shortest = repr(value)
    if -1e10 < value < 1e10 and "e" not in shortest:  # Python's form is Arrow's: most doubles
        return shortest
    sign, shortest = ("-", shortest[1:]) if value < 0 else ("", shortest)
    mantissa, _, exponent = shortest.partition("e")
    whole, _, fraction = mantissa.partition(".")
    digits = (whole + fraction).lstrip("0")
    point = len(whole) + int(exponent or 0) - (len(whole) + len(fraction) - len(digits))
    digits = digits.rstrip("0")
    if not -6 <= point - 1 < 10:  # exponent form: 1.5e+10, 1e-7
        return (f"{sign}{digits[0]}{'.' if len(digits) > 1 else ''}{digits[1:]}"
                f"e{'+' if point > 0 else '-'}{abs(point - 1)}")
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return f"{sign}{digits}{'0' * (point - len(digits))}.0"
    return f"{sign}{digits[:point]}.{digits[point:]}"


_PLAIN_WRITERS: dict[int, Callable[[Any], str]] = {
    pa.string().id: encode_basestring,  # json.dumps(text, ensure_ascii=False), without its set-up
    **{kind.id: str for kind in (pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(),
                                 pa.uint16(), pa.uint32(), pa.uint64())},
    pa.bool_().id: lambda flag: "true" if flag else "false",
    pa.float64().id: _double_json,
}
