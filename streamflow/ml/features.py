"""Feature rows for river: one dict per record, and the pickle that carries them to the worker.

River takes one dict per record. Building the dicts from Arrow columns costs about a
microsecond a record and pickling them for the model worker a third more, on the stage's
thread. When every column pickles as fixed-size items (64-bit floats, integers that fit in 32
bits, no nulls), :func:`pickled_feature_rows` writes the same pickle with numpy instead, about
twenty times faster: one fixed-size chunk of pickle opcodes per row. Unpickling it builds the
dicts in the worker, just as unpickling the list of dicts would.

Either pickle makes the worker intern the field names (``sys.intern``) and share them across
every row. River's models keep their per-feature state in dicts keyed by the names of the first
records they saw, so with interned names each lookup matches by identity instead of comparing
strings: a scaled linear regression learns about 6% faster than from dicts with keys of their
own. (A model restored from a checkpoint holds keys of its own, and goes back to comparing.)
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Sequence
from itertools import repeat

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamflow.ml.model import Features

_PROTOCOL = 4  # the opcodes below (MEMOIZE, STACK_GLOBAL) need protocol 4
_INT32 = np.iinfo(np.int32)


def feature_rows(table: pa.Table, names: Sequence[str] | None = None) -> list[Features]:
    """One dict per row of ``table``; nulls are left out, as river expects of missing values.

    The keys are the objects in ``names`` (the table's column names by default).
    """
    if names is None:
        names = table.column_names  # a property that builds a new list: read it once
    if not names:
        return [{} for _ in range(table.num_rows)]
    columns = [
        column.to_numpy().tolist()  # much faster than to_pylist, and the same Python values
        if column.null_count == 0 and (pa.types.is_integer(column.type)
                                       or pa.types.is_floating(column.type))
        else column.to_pylist()
        for column in table.columns
    ]
    rows = list(map(dict, map(zip, repeat(names), zip(*columns, strict=True))))  # C loops
    if any(column.null_count for column in table.columns):
        rows = [{k: v for k, v in row.items() if v is not None} for row in rows]
    return rows


def pickled_feature_rows(table: pa.Table) -> bytes:
    """A pickle that loads as ``feature_rows(table)``, with interned keys."""
    fixed = _fixed_size_pickle(table)
    if fixed is not None:
        return fixed
    names = table.column_names
    rows = io.BytesIO()
    pickler = pickle.Pickler(rows, protocol=_PROTOCOL)
    # The names are memoized already, as the prologue leaves them: every key is a GET of one.
    pickler.memo = {id(name): (index, name) for index, name in enumerate(names)}
    pickler.dump(feature_rows(table, names))
    return b"".join([*_interned_names(names), rows.getbuffer()[2:]])  # without its own PROTO


def _interned_names(names: Sequence[str]) -> list[bytes]:
    """The start of a pickle: PROTO, then each name passed through ``sys.intern`` and memoized
    at its index in ``names``, with nothing left on the stack."""
    opcodes = [pickle.PROTO, bytes([_PROTOCOL]), _unicode("sys"), _unicode("intern"),
               pickle.STACK_GLOBAL]
    for name in names:  # sys.intern stays on the stack, DUPlicated for each call
        opcodes += [pickle.DUP, _unicode(name), pickle.TUPLE1, pickle.REDUCE, pickle.MEMOIZE,
                    pickle.POP]
    opcodes.append(pickle.POP)
    return opcodes


def _unicode(text: str) -> bytes:
    """The opcode that pushes ``text``."""
    encoded = text.encode("utf-8", "surrogatepass")
    if len(encoded) < 256:
        return pickle.SHORT_BINUNICODE + bytes([len(encoded)]) + encoded
    return pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded


def _value_format(column: pa.ChunkedArray) -> tuple[bytes, str] | None:
    """The opcode and big- or little-endian numpy type that pickle this column's values, if
    they have a fixed size: BINFLOAT takes a big-endian double, BININT a little-endian int32."""
    if column.null_count:
        return None
    if pa.types.is_float64(column.type):
        return pickle.BINFLOAT, ">f8"
    if pa.types.is_integer(column.type) and len(column):
        low, high = pc.min_max(column).values()
        if _INT32.min <= low.as_py() and high.as_py() <= _INT32.max:
            return pickle.BININT, "<i4"
    return None


def _fixed_size_pickle(table: pa.Table) -> bytes | None:
    """The pickle of ``feature_rows(table)`` built column-wise, or None if a column's values
    have no fixed-size pickle.

    After the interned keys, each row is EMPTY_DICT, MARK, then per column a GET of its
    memoized key and the value, and SETITEMS; APPENDS adds the rows to a list.
    """
    names = table.column_names
    formats = [_value_format(column) for column in table.columns]
    if not names or not table.num_rows or None in formats:
        return None
    fields: list[tuple[str, str]] = [("open", "S2")]
    prefixes = []
    for index, value_format in enumerate(formats):
        assert value_format is not None
        opcode, value_type = value_format
        get = (pickle.BINGET + bytes([index]) if index < 256
               else pickle.LONG_BINGET + struct.pack("<I", index))
        prefixes.append(get + opcode)
        fields += [(f"p{index}", f"S{len(prefixes[-1])}"), (f"v{index}", value_type)]
    fields.append(("close", "S1"))
    rows = np.empty(table.num_rows, dtype=np.dtype(fields))
    rows["open"] = pickle.EMPTY_DICT + pickle.MARK
    for index, (prefix, column) in enumerate(zip(prefixes, table.columns, strict=True)):
        rows[f"p{index}"] = prefix
        rows[f"v{index}"] = column.to_numpy()
    rows["close"] = pickle.SETITEMS
    return b"".join([*_interned_names(names), pickle.EMPTY_LIST, pickle.MARK, rows.tobytes(),
                     pickle.APPENDS, pickle.STOP])
