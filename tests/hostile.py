"""Hostile records for the fuzz harness of issue 13, and the record-by-record invariant check.

Every record has a trace number ``n``: the ``"id"`` field of a JSON object (always an integer,
exactly once at the top level) and, for every record whether it is JSON or not, its Kafka key
(``str(n)``) or, in a decoder batch, its position. Each record is of one kind:

- :data:`GOOD`: an ordinary record; it must come through every stage (or be filtered by an
  explicit predicate), so a good record dead-lettered is collateral damage;
- :data:`ODD`: a JSON object with ``id`` and something hostile (a huge string, deep but legal
  nesting, odd or case-colliding field names, NaN, a type that differs from other records', a
  repeated field name, a BOM): it may come through or be dead-lettered, but exactly once;
- :data:`BAD`: a value the JSON decoder must refuse (not an object, not UTF-8, a lone
  surrogate, nesting over :data:`MAX_DEPTH`, 1e400, trailing garbage, empty): dead-lettered.

The same builders serve hypothesis (:func:`hostile_batches`, driven by a Random that hypothesis
controls and shrinks) and the seeded generator of the long run (:func:`generate`).
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fastavro
from hypothesis import strategies as st

from streamflow.processing.codec import MAX_DEPTH

GOOD, ODD, BAD = "good", "odd", "bad"


@dataclass(frozen=True)
class Hostile:
    """One generated record: its trace number, kind, family (which builder made it) and value."""

    n: int
    kind: str
    family: str
    value: bytes | None

    @property
    def key(self) -> bytes:
        return str(self.n).encode()


Builder = Callable[[int, random.Random], bytes | None]

WORDS = ["alpha", "beta", "Gamma", "  padded  ", "déjà vu", "日本", "a,b", 'quo"te', "back\\slash", ""]
PARTS = ["p0", "p1", "p2"]
# Field names a sink or the runtime may stumble on; "id" itself is never among them.
ODD_NAMES = ["", " ", "\x00", "a\x00b", "tab\there", "line\nbreak", "n" * 63 + "x", "n" * 63 + "y",
             "L" * 200, "Val", "val", "VAL", "ID", "Id", "_sf_row", "_sf_topic", "_sf_seq", "_sf~",
             "_sf~_sf_row", "é", "e\u0301", "😀", "a.b", "a/b", 'a"b', "a\\b", "select", "x y",
             "\u202eltr", "\ufeffbom", "part", "__HIVE_DEFAULT_PARTITION__"]
PART_VALUES: list[Any] = [None, "", "__HIVE_DEFAULT_PARTITION__", "__EMPTY__", "/", "..", "a/../b",
                          "%2F", " 14", "x" * 300, 1.5, 7, True, {"a": 1}, [1, 2], "é"]
MIXES: list[Any] = [1, -7, 2.5, "a", "", "12", [1], [1, "a"], [], {"y": 1}, {}, None, True,
                    10**30, 2**63, -(2**63), 1e308, -0.0, [[None, None]], {"y": {"z": [1]}}]
TEXT_CHARS = "aé😀\"\\\n\t\x00\x7f\u2028\ufeff\uffff"


def _dumps(document: Any, rng: random.Random) -> bytes:
    return json.dumps(document, ensure_ascii=rng.random() < 0.5).encode()


def _good_document(n: int, rng: random.Random) -> dict[str, Any]:
    return {"id": n, "x": round(rng.uniform(-1000, 1000), 3), "name": rng.choice(WORDS),
            "ok": rng.random() < 0.5, "part": rng.choice(PARTS),
            "tags": [rng.choice(WORDS) for _ in range(rng.randrange(3))]}


def _text(rng: random.Random, length: int) -> str:
    """Random text of any code points but lone surrogates."""
    chars = []
    for _ in range(length):
        point = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0, 0x20), rng.randrange(0x80, 0xD800),
                            rng.randrange(0xE000, 0x110000), ord(rng.choice(TEXT_CHARS))])
        chars.append(chr(point))
    return "".join(chars)


def nested(depth: int, kind: str) -> bytes:
    """JSON nesting ``depth`` arrays (``arrays``), objects (``objects``) or arrays never closed
    (``open``), each level counted."""
    if kind == "objects":
        return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)
    if kind == "open":
        return b"[" * depth
    return b"[" * depth + b"]" * depth


def _with_id(n: int, inner: bytes, name: bytes = b"v") -> bytes:
    return b'{"id":%d,"%s":%s}' % (n, name, inner)


# Good records.

def good(n: int, rng: random.Random) -> bytes:
    return _dumps(_good_document(n, rng), rng)


# Odd records: JSON objects with an id, each hostile in one way.

HUGE_SIZES = (10_000, 100_000, 400_000)  # bytes of text (under the 1 MB of a Kafka message)


def huge(n: int, rng: random.Random, sizes: tuple[int, ...] = HUGE_SIZES) -> bytes:
    char = rng.choice("xé😀\"\\\n")
    blob = char * (rng.choice(sizes) // (len(json.dumps(char, ensure_ascii=False).encode()) - 2))
    return json.dumps({**_good_document(n, rng), "blob": blob}, ensure_ascii=False).encode()


def deep(n: int, rng: random.Random) -> bytes:
    """Nesting up to the decoder's limit, the record's own object counted."""
    return _with_id(n, nested(rng.randint(1, MAX_DEPTH - 1), rng.choice(["arrays", "objects"])))


def names(n: int, rng: random.Random) -> bytes:
    document: dict[str, Any] = {"id": n}
    for name in rng.sample(ODD_NAMES, rng.randint(1, 4)):
        document[name] = rng.choice([1, "v", 2.5, None, True])
    return _dumps(document, rng)


def partition(n: int, rng: random.Random) -> bytes:
    """A ``part`` value no directory name holds as it is, or cannot hold at all."""
    return _dumps({**_good_document(n, rng), "part": rng.choice(PART_VALUES)}, rng)


def nan(n: int, rng: random.Random) -> bytes:
    name = rng.choice([b"x", b"f"])
    literal = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e-400", b"-0.0", b"1e308"])
    return _with_id(n, literal, name)


def mix(n: int, rng: random.Random) -> bytes:
    """A field whose type differs from record to record (``x`` included, a float elsewhere)."""
    document = _good_document(n, rng)
    document[rng.choice(["mix", "mix", "x", "name"])] = rng.choice(MIXES)
    return _dumps(document, rng)


def duplicates(n: int, rng: random.Random) -> bytes:
    return rng.choice([b'{"id":%d,"a":1,"a":"two"}', b'{"id":%d,"o":{"k":1,"k":[2]}}',
                       b'{"id":%d,"x":1.5,"x":2.5}', b'{"id":%d,"mix":null,"mix":{}}']) % n


def unicode(n: int, rng: random.Random) -> bytes:
    """Any code point but lone surrogates, in values and names; escaped pairs; a BOM; CRLF."""
    document: dict[str, Any] = {"s": _text(rng, rng.randint(0, 40)), _text(rng, rng.randint(1, 5)): 1}
    document["id"] = n  # last: a random name "id" is overwritten
    text = _dumps(document, rng)
    return rng.choice([
        text, b"\xef\xbb\xbf" + text, text.replace(b",", b",\r\n", 1), b" \t" + text + b" \n",
        b'{"id":%d,"s":"\\ud83d\\ude00\\u0000\\uffff"}' % n,
    ])


def empty_object(n: int, rng: random.Random) -> bytes:
    return rng.choice([b'{"id":%d}', b'{"id":%d,"x":null}', b'{"id":%d,"tags":[null,null]}',
                       b'{"id":%d,"o":{}}', b'{"id":%d,"o":[{}]}', b'{"id":%d,"o":{"p":{}}}']) % n


# Bad records: the decoder refuses each.

def not_object(n: int, rng: random.Random) -> bytes:
    return rng.choice([b"[1,2]", b"[]", b"null", b"1", b"-0", b'"text"', b"true", b'[{"id":%d}]' % n,
                       b'"{\\"id\\":%d}"' % n])


def garbage(n: int, rng: random.Random) -> bytes:
    return rng.choice([b"\xff" + rng.randbytes(rng.randrange(40)), b"{not json", b'{"id":%d,}' % n,
                       b"{'id': %d}" % n, b'{"id":%d' % n, b'{"id":%d}}' % n, b"\x00" * 3,
                       b'{"id":%d,"a":01}' % n, b'{"id":%d,"a":.5}' % n, b"{ }x"])


def trailing(n: int, rng: random.Random) -> bytes:
    text = b'{"id":%d}' % n
    return rng.choice([text + b" x", text + text, text + b"\n" + text, text + b"\x00", text + b"\xff"])


def invalid_utf8(n: int, rng: random.Random) -> bytes:
    wrong = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"])
    return rng.choice([b'{"id":%d,"s":"%s"}', b'{"id":%d,"%s":1}']) % (n, wrong)


def surrogate(n: int, rng: random.Random) -> bytes:
    lone = rng.choice([b"\\ud800", b"\\udfff", b"\\ud83d", b"\\ude00\\ud83d", b"\\ud800\\ud800"])
    return rng.choice([b'{"id":%d,"s":"%s"}', b'{"id":%d,"%s":1}', b'{"id":%d,"s":["a","%s"]}']) % (n, lone)


DEPTHS = (MAX_DEPTH, MAX_DEPTH + 1, MAX_DEPTH + 50, 1_000, 10_000)


def too_deep(n: int, rng: random.Random, depths: tuple[int, ...] = DEPTHS) -> bytes:
    """Nesting over the limit, the record's own object counted (``open``: never closed)."""
    return _with_id(n, nested(rng.choice(depths), rng.choice(["arrays", "objects", "open"])))


def overflow(n: int, rng: random.Random) -> bytes:
    return _with_id(n, rng.choice([b"1e400", b"-1e400", b"[1e999]", b'{"a":2E+308}']))


def empty(n: int, rng: random.Random) -> bytes | None:
    return rng.choice([b"", None])


def csv_line(n: int, rng: random.Random) -> bytes:
    return rng.choice([b"%d,a,b" % n, b"id,x\n%d,2" % n, b"%d\ta" % n])


def truncated(n: int, rng: random.Random) -> bytes:
    text = good(n, rng)
    return text[:rng.randrange(1, len(text) - 1)]


FAMILIES: dict[str, tuple[str, Builder, int]] = {  # name: (kind, builder, weight)
    "good": (GOOD, good, 40),
    "huge": (ODD, huge, 1), "deep": (ODD, deep, 3), "names": (ODD, names, 6),
    "partition": (ODD, partition, 3), "nan": (ODD, nan, 3), "mix": (ODD, mix, 6),
    "duplicates": (ODD, duplicates, 3), "unicode": (ODD, unicode, 5), "empty_object": (ODD, empty_object, 2),
    "not_object": (BAD, not_object, 3), "garbage": (BAD, garbage, 3), "trailing": (BAD, trailing, 2),
    "invalid_utf8": (BAD, invalid_utf8, 3), "surrogate": (BAD, surrogate, 3), "too_deep": (BAD, too_deep, 2),
    "overflow": (BAD, overflow, 2), "empty": (BAD, empty, 1), "csv_line": (BAD, csv_line, 2),
    "truncated": (BAD, truncated, 2),
}


def build(family: str, n: int, rng: random.Random) -> Hostile:
    kind, builder, _weight = FAMILIES[family]
    return Hostile(n, kind, family, builder(n, rng))


def hostile_batches(max_size: int = 30, families: Iterable[str] = FAMILIES
                    ) -> st.SearchStrategy[list[Hostile]]:
    """Lists of hostile records numbered 0, 1, ... (hypothesis shrinks both the families and
    the random choices inside each)."""
    entries = st.tuples(st.sampled_from(sorted(families)), st.randoms(use_true_random=False))
    return st.lists(entries, max_size=max_size).map(
        lambda drawn: [build(family, n, rng) for n, (family, rng) in enumerate(drawn)])


def generate(count: int, seed: int = 13, start: int = 0, huge_every: int = 2_000) -> Iterator[Hostile]:
    """``count`` records numbered from ``start``, the same for the same seed. Huge records come
    about once in ``huge_every`` (each up to 400 kB), so a long run stays a matter of minutes."""
    rng = random.Random(seed)
    names_ = [name for name in FAMILIES if name != "huge"]
    weights = [FAMILIES[name][2] for name in names_]
    for n in range(start, start + count):
        family = "huge" if rng.randrange(huge_every) == 0 else rng.choices(names_, weights)[0]
        yield build(family, n, rng)


# CSV lines (columns id, name, note) and Avro values, with their kinds.

CSV_COLUMNS = ["id", "name", "note"]


def csv_record(n: int, rng: random.Random) -> Hostile:
    def quoted(text: str) -> str:
        return '"' + text.replace('"', '""') + '"'

    choice = rng.randrange(10)
    if choice < 4:
        line = f"{n},{rng.choice(['a', 'b c', 'é'])},{rng.randrange(99)}"
        return Hostile(n, GOOD, "csv_good", line.encode())
    if choice < 7:
        odd = quoted(rng.choice(['a,b', 'say "hi"', "\x00", "😀", "\ufeff", "", " "]))
        return Hostile(n, ODD, "csv_odd", f"{n},{odd},{rng.choice([odd, '', 'x'])}".encode())
    value = rng.choice([b"%d" % n, b"%d,a" % n, b"%d,a,b,c" % n, b"%d,\xff\xfe,b" % n,
                        b"%d,a,b\n%d,c,d" % (n, n), b"", None, b"%d,a,\xed\xa0\x80" % n])
    return Hostile(n, BAD, "csv_bad", value)


AVRO_SCHEMA = {"type": "record", "name": "R", "fields": [
    {"name": "id", "type": "long"}, {"name": "name", "type": "string"}, {"name": "x", "type": "double"},
    {"name": "tags", "type": {"type": "array", "items": "string"}}]}
_PARSED_AVRO = fastavro.parse_schema(AVRO_SCHEMA)


def avro_value(record: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    fastavro.schemaless_writer(out, _PARSED_AVRO, record)
    return out.getvalue()


def avro_record(n: int, rng: random.Random) -> Hostile:
    document = {"id": n, "name": _text(rng, rng.randrange(6)),
                "x": rng.choice([1.5, float("nan"), -0.0, 1e308]),
                "tags": [rng.choice(WORDS) for _ in range(rng.randrange(3))]}
    valid = avro_value(document)
    choice = rng.randrange(10)
    if choice < 5:
        return Hostile(n, GOOD, "avro_good", valid)
    if choice < 7:  # bytes after the record, or anything at all: may read as a record
        anything = rng.choice([valid + rng.randbytes(3), rng.randbytes(rng.randrange(1, 30))])
        return Hostile(n, ODD, "avro_odd", anything)
    return Hostile(n, BAD, "avro_bad", rng.choice([valid[:rng.randrange(len(valid))], None]))


def csv_batches(max_size: int = 30) -> st.SearchStrategy[list[Hostile]]:
    return st.lists(st.randoms(use_true_random=False), max_size=max_size).map(
        lambda rngs: [csv_record(n, rng) for n, rng in enumerate(rngs)])


def avro_batches(max_size: int = 30) -> st.SearchStrategy[list[Hostile]]:
    return st.lists(st.randoms(use_true_random=False), max_size=max_size).map(
        lambda rngs: [avro_record(n, rng) for n, rng in enumerate(rngs)])


# A processor stage as pipelines write them: decode, tidy, check, filter, derive.
STAGE_STEPS: list[tuple[str, Any]] = [
    ("parse", {"format": "json"}),
    ("normalize", {"name": ["trim", "nfc"]}),
    ("validate", {"id": {"not_null": True}, "x": {"min": -1e6, "max": 1e6}}),
    ("filter", "id % 5 <> 0"),
    ("sql", "SELECT *, id * 2 AS twice FROM batch"),
]


def filtered_by_stage(record: Hostile) -> bool:
    """Whether :data:`STAGE_STEPS` may filter ``record`` (its filter drops ids divisible by 5)."""
    return record.kind != BAD and record.n % 5 == 0


# The invariant, record by record.

@dataclass
class Tally:
    """Where one stage's input records went, by trace number; :meth:`check` asserts the
    invariant and returns the counts."""

    stage: str
    consumed: dict[int, Hostile]
    out: list[int] = field(default_factory=list)
    dead: list[int] = field(default_factory=list)
    filtered: int = 0  # the stage's own count

    def check(self, filtered_ok: Callable[[Hostile], bool] = lambda _record: False,
              good_passes: bool = True) -> dict[str, int]:
        """Each consumed record exactly once out or dead-lettered, or else filtered (and then
        ``filtered_ok``); nothing from elsewhere; bad records dead-lettered; with
        ``good_passes``, no good record dead-lettered (collateral damage)."""
        out, dead = Counter(self.out), Counter(self.dead)
        duplicated = sorted(n for n, times in (out + dead).items() if times > 1)
        strangers = sorted((set(out) | set(dead)) - set(self.consumed))
        missing = [n for n in self.consumed if n not in out and n not in dead]
        lost = [n for n in missing if not filtered_ok(self.consumed[n])]
        counts = {"records": len(self.consumed), "out": len(self.out), "filtered": len(missing) - len(lost),
                  "dead_lettered": len(self.dead), "lost": len(lost), "duplicated": len(duplicated)}
        where = f"stage {self.stage}: {counts}"
        assert not duplicated, f"{where}: twice (out or dead-lettered): {self._show(duplicated)}"
        assert not strangers, f"{where}: records it never consumed: {strangers[:20]}"
        assert not lost, f"{where}: lost: {self._show(lost)}"
        assert len(missing) == self.filtered, f"{where}: {len(missing)} missing, {self.filtered} filtered"
        passed_bad = [n for n in out if self.consumed[n].kind == BAD]
        assert not passed_bad, f"{where}: bad records came out: {self._show(passed_bad)}"
        if good_passes:
            collateral = [n for n in dead if self.consumed[n].kind == GOOD]
            assert not collateral, f"{where}: good records dead-lettered: {self._show(collateral)}"
        return counts

    def _show(self, numbers: list[int]) -> list[tuple[int, str, bytes | None]]:
        return [(n, self.consumed[n].family, (self.consumed[n].value or b"")[:120]) for n in numbers[:10]]
