"""Arrow kernels for the simplest ``filter`` predicates and ``sql`` derived fields.

DuckDB costs about a millisecond a statement however small the batch, which at a few thousand
records a second is most of a stage's time. A predicate, or a ``SELECT *, <expr> AS <name>, ...
FROM batch`` statement, built only of columns, numeric literals, ``+ - * /``, comparisons,
``AND``, ``OR``, ``NOT`` and parentheses is compiled here and evaluated with Arrow kernels, giving
DuckDB's result bit for bit: IEEE arithmetic on doubles, SQL's three-valued logic.

Anything else goes to DuckDB: a statement this grammar does not take (a function, a keyword, a
string, a comment, or too large a statement) for good, and a batch for which the kernels could
differ from DuckDB (a named column missing, named twice, or not a double; a NaN compared, which
DuckDB orders above every number; a column name DuckDB reads otherwise, or a column type it
does not read or its ``SELECT *`` would change) for that batch.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from streamflow.processing.schema_memo import PerSchema

# DuckDB's keywords other than its unreserved ones (``duckdb_keywords()``): as a bare word they
# are not a column (``true``, ``current_date``...), or not always. A test keeps it in step.
KEYWORDS = frozenset("""
all analyse analyze and anti any array as asc asof asymmetric at authorization between bigint
binary bit boolean both by case cast char character check coalesce collate collation column
columns concurrently constraint create cross current_catalog current_date current_role
current_schema current_time current_timestamp current_user dec decimal default deferrable desc
describe distinct do else end except exists extract false fetch float for foreign freeze from
full generated glob group grouping grouping_id having ilike in initially inner inout int integer
intersect interval into is isnull join lambda lateral leading left like limit localtime
localtimestamp map national natural nchar none not notnull null nullif numeric offset on only or
order out outer overlaps overlay pivot pivot_longer pivot_wider placing position positional
precision primary qualify real references returning right row select semi session_user setof show
similar smallint some struct substring summarize symmetric table tablesample then time timestamp
to trailing treat trim true try_cast tuple union unique unpack unpivot user using values varchar
variadic verbose when where window with xmlattributes xmlconcat xmlelement xmlexists xmlforest
xmlnamespaces xmlparse xmlpi xmlroot xmlserialize xmltable
""".split())  # noqa: SIM905

# Column types whose values DuckDB's ``SELECT *`` returns unchanged, type and all (a test checks
# each); a batch with any other column goes to DuckDB. tz-aware timestamps come back in the
# connection's time zone, which :func:`~streamflow.processing.steps.thread_connection` sets to UTC.
_KEPT_TYPES = frozenset([
    pa.null(), pa.bool_(), pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(),
    pa.uint32(), pa.uint64(), pa.float32(), pa.float64(), pa.string(), pa.binary(), pa.date32(),
    pa.timestamp("us"), pa.timestamp("us", tz="UTC"),
])

_TOKEN = re.compile(r"""
    [ \t\r\n]+
  | (?P<number>(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?P<exponent>[eE][+-]?[0-9]+)?)(?![A-Za-z0-9_.])
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
  | "(?P<quoted>(?:[^"]|"")+)"
  | (?P<operator>[-+*/<>=~!@\#%^&|`?]+)
  | (?P<punctuation>[(),])
""", re.VERBOSE)
_OPERATORS = frozenset(["+", "-", "*", "/", "<", ">", "=", "==", "<=", ">=", "<>", "!="])
_ARITHMETIC: dict[str, Callable[..., pa.ChunkedArray]] = {
    "+": pc.add, "-": pc.subtract, "*": pc.multiply, "/": pc.divide}
_COMPARISON: dict[str, Callable[..., pa.ChunkedArray]] = {
    "=": pc.equal, "==": pc.equal, "!=": pc.not_equal, "<>": pc.not_equal, "<": pc.less,
    "<=": pc.less_equal, ">": pc.greater, ">=": pc.greater_equal}
_MAX_EXACT_DIGITS = 15  # an integer or decimal literal of more digits may not be one double
# Bounds on a statement's size, under DuckDB's own and far under Python's recursion limit (each
# level of parentheses takes eight frames of the parser).
_MAX_OPERATIONS = 200
_MAX_PARENTHESES = 32
Compiled = TypeVar("Compiled")


class Unsupported(Exception):
    """This statement, or this batch, is DuckDB's to evaluate."""


@dataclass(frozen=True)
class _Token:
    kind: str  # "number", "word", "name" (quoted), "symbol"
    text: str
    exact: bool = False  # a number without exponent: DuckDB's INTEGER or DECIMAL


def _tokens(sql: str) -> list[_Token]:
    if "--" in sql or "/*" in sql:
        raise Unsupported("a comment")
    tokens, position = [], 0
    while position < len(sql):
        match = _TOKEN.match(sql, position)
        if match is None:
            raise Unsupported(f"{sql[position]!r} at {position}")
        position = match.end()
        if match["number"] is not None:
            tokens.append(_Token("number", match["number"], exact=match["exponent"] is None))
        elif match["word"] is not None:
            tokens.append(_Token("word", match["word"]))
        elif match["quoted"] is not None:
            tokens.append(_Token("name", match["quoted"].replace('""', '"')))
        elif match["operator"] is not None:
            operator = _operator(match["operator"])
            position = match.start() + len(operator)
            tokens.append(_Token("symbol", operator))
        elif match["punctuation"] is not None:
            tokens.append(_Token("symbol", match["punctuation"]))
    return tokens


def _operator(run: str) -> str:
    """The operator a run of operator characters starts with, as DuckDB's (PostgreSQL's) lexer
    takes it: the whole run, less any trailing ``+`` and ``-`` when it holds none of
    ``~!@#%^&|`?`` (``<-1`` is ``<`` then ``-1``; ``!=-1`` is the unknown operator ``!=-``)."""
    operator = run
    if not set(run) & set("~!@#%^&|`?"):
        while len(operator) > 1 and operator[-1] in "+-":
            operator = operator[:-1]
    if operator not in _OPERATORS:
        raise Unsupported(f"operator {operator!r}")
    return operator


class Expression(ABC):
    """A compiled expression: ``number`` (a double) or ``boolean``."""

    kind: str
    columns: frozenset[str] = frozenset()  # the lower-cased names it reads

    @abstractmethod
    def evaluate(self, columns: dict[str, pa.ChunkedArray]) -> pa.ChunkedArray | pa.Scalar:
        """The values over ``columns`` (by lower-cased name), or :class:`Unsupported`."""


@dataclass(frozen=True)
class _Column(Expression):
    name: str
    kind = "number"

    @property
    def columns(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset([self.name.lower()])

    def evaluate(self, columns: dict[str, pa.ChunkedArray]) -> pa.ChunkedArray:
        return columns[self.name.lower()]


@dataclass(frozen=True)
class _Literal(Expression):
    value: float
    exact: bool  # INTEGER or DECIMAL: negated, zero stays +0.0
    kind = "number"

    def evaluate(self, columns: dict[str, pa.ChunkedArray]) -> pa.Scalar:
        return self.scalar

    @cached_property
    def scalar(self) -> pa.Scalar:
        return pa.scalar(self.value, pa.float64())  # made once: about 4 µs a batch


@dataclass(frozen=True)
class _Unary(Expression):
    operator: str  # "-" (a number's negation) or "not"
    operand: Expression

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "number" if self.operator == "-" else "boolean"

    @property
    def columns(self) -> frozenset[str]:  # type: ignore[override]
        return self.operand.columns

    def evaluate(self, columns: dict[str, pa.ChunkedArray]) -> pa.ChunkedArray:
        operand = self.operand.evaluate(columns)
        return pc.negate(operand) if self.operator == "-" else pc.invert(operand)


@dataclass(frozen=True)
class _Binary(Expression):
    operator: str
    left: Expression
    right: Expression

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "number" if self.operator in _ARITHMETIC else "boolean"

    @property
    def columns(self) -> frozenset[str]:  # type: ignore[override]
        return self.left.columns | self.right.columns

    def evaluate(self, columns: dict[str, pa.ChunkedArray]) -> pa.ChunkedArray:
        left, right = self.left.evaluate(columns), self.right.evaluate(columns)
        if self.operator in _ARITHMETIC:
            return _ARITHMETIC[self.operator](left, right)
        if self.operator == "and":
            return pc.and_kleene(left, right)
        if self.operator == "or":
            return pc.or_kleene(left, right)
        if any(isinstance(side, pa.ChunkedArray) and _has_nan(side) for side in (left, right)):
            raise Unsupported("a NaN compared: DuckDB orders NaN above every number")
        return _COMPARISON[self.operator](left, right)


def _has_nan(values: pa.ChunkedArray) -> bool:
    """Whether a double column holds a NaN: one NumPy call when none is null (NumPy would see
    a null as NaN), where two kernel calls cost a small batch more."""
    if not values.null_count:
        return bool(np.isnan(values.to_numpy()).any())
    return bool(pc.any(pc.is_nan(values)).as_py())


class _Parser:
    """Precedence as in DuckDB's grammar, lowest first: OR, AND, NOT, one comparison (they do
    not chain), ``+ -``, ``* /``, unary minus. Every operator needs a column below it: DuckDB
    folds constants in their own types (INTEGER, DECIMAL), which this does not model."""

    def __init__(self, sql: str) -> None:
        self.tokens = _tokens(sql)
        self.position = 0
        self.operations = 0
        self.parentheses = 0

    def count(self) -> None:
        """One more operator (or pair of parentheses) in the statement."""
        self.operations += 1
        if self.operations > _MAX_OPERATIONS or self.parentheses > _MAX_PARENTHESES:
            raise Unsupported("a statement this large")

    def peek(self, *texts: str) -> bool:
        if self.position >= len(self.tokens):
            return False
        token = self.tokens[self.position]
        return token.kind in ("symbol", "word") and token.text.lower() in texts

    def take(self, *texts: str) -> str:
        if not self.peek(*texts):
            raise Unsupported(f"expected {' or '.join(texts)}")
        self.position += 1
        return self.tokens[self.position - 1].text.lower()

    def done(self) -> bool:
        return self.position == len(self.tokens)

    def expression(self) -> Expression:
        left = self.conjunction()
        while self.peek("or"):
            self.take("or")
            self.count()
            left = _logical("or", left, self.conjunction())
        return left

    def conjunction(self) -> Expression:
        left = self.negation()
        while self.peek("and"):
            self.take("and")
            self.count()
            left = _logical("and", left, self.negation())
        return left

    def negation(self) -> Expression:
        if self.peek("not"):
            self.take("not")
            self.count()
            operand = self.negation()
            if operand.kind != "boolean":
                raise Unsupported("NOT of a number")
            return _Unary("not", operand)
        return self.comparison()

    def comparison(self) -> Expression:
        left = self.sum()
        if self.peek(*_COMPARISON):
            operator = self.take(*_COMPARISON)
            self.count()
            return _operation(operator, left, self.sum())
        return left

    def sum(self) -> Expression:
        left = self.product()
        while self.peek("+", "-"):
            operator = self.take("+", "-")
            self.count()
            left = _operation(operator, left, self.product())
        return left

    def product(self) -> Expression:
        left = self.unary()
        while self.peek("*", "/"):
            operator = self.take("*", "/")
            self.count()
            left = _operation(operator, left, self.unary())
        return left

    def unary(self) -> Expression:
        if self.peek("-"):
            self.take("-")
            self.count()
            operand = self.unary()
            if isinstance(operand, _Literal):
                negated = -operand.value
                return _Literal(negated if negated or not operand.exact else 0.0, operand.exact)
            if operand.kind != "number":
                raise Unsupported("minus of a boolean")
            return _Unary("-", operand)
        return self.primary()

    def primary(self) -> Expression:
        if self.peek("("):
            self.take("(")
            self.parentheses += 1
            self.count()
            inner = self.expression()
            self.take(")")
            self.parentheses -= 1
            return inner
        if self.done():
            raise Unsupported("the expression ends early")
        token = self.tokens[self.position]
        self.position += 1
        if token.kind == "number":
            return _literal(token)
        return _Column(_name(token))

    def alias(self) -> str:
        if self.done():
            raise Unsupported("no alias")
        self.position += 1
        return _name(self.tokens[self.position - 1])


def _name(token: _Token) -> str:
    """A column's name or an alias: a bare word that is no keyword, or a quoted name, in ASCII
    (DuckDB's case folding beyond it is its own) and without NUL (DuckDB ends a name there)."""
    bare_word = token.kind == "word" and token.text.lower() not in KEYWORDS
    if (token.kind == "name" or bare_word) and _plain(token.text):
        return token.text
    raise Unsupported(f"{token.text!r} is no name")


def _literal(token: _Token) -> _Literal:
    if token.exact and len(token.text.replace(".", "").lstrip("0")) > _MAX_EXACT_DIGITS:
        raise Unsupported(f"literal {token.text} has more digits than a double keeps")
    value = float(token.text)
    if value in (float("inf"), float("-inf")):
        raise Unsupported(f"literal {token.text} is out of a double's range")
    return _Literal(value, token.exact)


def _operation(operator: str, left: Expression, right: Expression) -> _Binary:
    if left.kind != "number" or right.kind != "number":
        raise Unsupported(f"{operator} of a boolean")
    if not left.columns | right.columns:
        raise Unsupported(f"{operator} of two literals")
    return _Binary(operator, left, right)


def _logical(operator: str, left: Expression, right: Expression) -> _Binary:
    if left.kind != "boolean" or right.kind != "boolean":
        raise Unsupported(f"{operator.upper()} of a number")
    return _Binary(operator, left, right)


def _plain(name: str) -> bool:
    """Whether DuckDB takes ``name`` as it is, and folds its case as Python does: ASCII (the
    Kelvin sign's lower case is "k" to Python, not to DuckDB), not empty (DuckDB's ``SELECT *``
    names such a column "v1"), and without NUL."""
    return name.isascii() and name != "" and "\x00" not in name


def _readable(kind: pa.DataType) -> bool:
    """Whether DuckDB reads a column of type ``kind`` (a test checks each kind taken here)."""
    if kind in _KEPT_TYPES or kind in (pa.large_string(), pa.large_binary()):
        return True
    if pa.types.is_timestamp(kind) or pa.types.is_decimal128(kind):
        return True
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _readable(kind.value_type)
    if pa.types.is_struct(kind):
        return all(_readable(field.type) for field in kind)
    if pa.types.is_map(kind):
        return _readable(kind.key_type) and _readable(kind.item_type)
    return False


def _indices(schema: pa.Schema, names: frozenset[str]) -> dict[str, int] | None:
    """The index of each column ``names`` reads, by lower-cased name, in a table of ``schema``:
    one double column each. None when there is not, or when DuckDB would not read every column
    of such a table as it is (a name it changes, a type it does not read)."""
    column_names = schema.names
    if not all(map(_plain, column_names)) or not all(map(_readable, schema.types)):
        return None
    found: dict[str, list[int]] = {name: [] for name in names}
    for index, column_name in enumerate(column_names):
        folded = column_name.lower()
        if folded in found:
            found[folded].append(index)
    indices = {}
    for name, at in found.items():
        if len(at) != 1 or schema.types[at[0]] != pa.float64():
            return None
        indices[name] = at[0]
    return indices


def _bound(table: pa.Table, indices: dict[str, int]) -> dict[str, pa.ChunkedArray]:
    """The columns at ``indices`` (see :func:`_indices`), by lower-cased name."""
    return {name: table.column(index) for name, index in indices.items()}


class ArrowPredicate:
    """A ``filter`` predicate evaluated with Arrow kernels (see the module's docstring)."""

    def __init__(self, sql: str) -> None:
        parser = _Parser(sql)
        self.expression = parser.expression()
        if not parser.done():
            raise Unsupported("text after the predicate")
        if self.expression.kind != "boolean":
            raise Unsupported("a number as predicate")
        reads = self.expression.columns
        self._indices = PerSchema(lambda schema: _indices(schema, reads))

    def keep(self, table: pa.Table) -> pa.ChunkedArray | None:
        """The predicate over ``table``'s rows (true, false or null), or None for DuckDB."""
        indices = self._indices(table.schema)
        if indices is None:
            return None
        try:
            return self.expression.evaluate(_bound(table, indices))
        except Unsupported:
            return None


class ArrowProjection:
    """``SELECT *, <expr> AS <name>, ... FROM batch`` evaluated with Arrow kernels."""

    def __init__(self, sql: str) -> None:
        parser = _Parser(sql)
        parser.take("select")
        parser.take("*")
        self.fields: list[tuple[str, Expression]] = []
        while parser.peek(","):
            parser.take(",")
            expression = parser.expression()
            if not expression.columns:
                raise Unsupported("a field without a column")
            parser.take("as")
            self.fields.append((parser.alias(), expression))
        if not self.fields:
            raise Unsupported("no derived field")
        parser.take("from")
        parser.take("batch")
        if not parser.done():
            raise Unsupported("text after FROM batch")
        aliases = [name.lower() for name, _ in self.fields]
        if len(set(aliases)) != len(aliases):
            raise Unsupported("a name given twice")
        self._aliases = frozenset(aliases)
        self._reads = frozenset().union(*(expression.columns for _, expression in self.fields))
        self._indices = PerSchema(self._applicable)

    def _applicable(self, schema: pa.Schema) -> dict[str, int] | None:
        """:func:`_indices` for a table of ``schema``, or None when DuckDB's ``SELECT *`` would
        change a column type or name of it, such as two names that differ only in case."""
        names = {name.lower() for name in schema.names}
        if (any(kind not in _KEPT_TYPES for kind in schema.types)
                or len(names) != len(schema) or self._aliases & names):
            return None
        return _indices(schema, self._reads)

    def apply(self, table: pa.Table) -> pa.Table | None:
        """``table`` with the derived fields appended, as DuckDB returns it, or None for DuckDB
        (see :meth:`_applicable`)."""
        indices = self._indices(table.schema)
        if indices is None:
            return None
        try:
            columns = _bound(table, indices)
            derived = [(name, expression.evaluate(columns)) for name, expression in self.fields]
        except Unsupported:
            return None
        # Named, not given a schema: every field nullable and without metadata, as DuckDB's.
        return pa.Table.from_arrays([*table.columns, *(values for _, values in derived)],
                                    names=[*table.schema.names, *(name for name, _ in derived)])


def compiled(build: Callable[[str], Compiled], sql: str) -> Compiled | None:
    """``build(sql)``, or None when the statement is DuckDB's."""
    try:
        return build(sql)
    except Unsupported:
        return None
