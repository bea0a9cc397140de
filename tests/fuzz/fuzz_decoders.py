"""Atheris target of the fuzz harness (issue 13): ``make fuzz`` (FUZZ_SECONDS, default 60).

An input is a batch of record values separated by the byte 0x1e. The batch goes through the
JSON decoder in its four modes, the CSV and Avro parse steps, and a processor stage with the
typical steps of tests/hostile.py; each must put every record, exactly once, in its output (by
``_sf_row``), its failures or (the stage only) the filtered ones, and the stage's output must be
JSON objects the next stage decodes. Any exception or broken invariant is a crash that atheris
reports with the input that caused it. The seed corpus is made from the seeded generator.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["streamflow", "connectors"]):
    import pyarrow as pa

    from streamflow.plugins import ROW_ID
    from streamflow.processing.codec import decode_json, user_fields
    from streamflow.runtime.stages import StepRunner, decode_input, output_batches, run_steps
    from tests.hostile import AVRO_SCHEMA, CSV_COLUMNS, STAGE_STEPS, generate
    from tests.tables import step

SEPARATOR = b"\x1e"
SCHEMA = pa.schema([("id", pa.int64()), ("x", pa.float64()), ("name", pa.string())])
STAGE = [StepRunner(step(kind, options)) for kind, options in STAGE_STEPS]
PARSERS = [[StepRunner(step("parse", {"format": "csv", "columns": CSV_COLUMNS}))],
           [StepRunner(step("parse", {"format": "avro", "schema": AVRO_SCHEMA}))]]


def partition(what: str, count: int, out: list[int], failed: list[int], filtered_allowed: bool) -> None:
    """Every row of ``range(count)`` once in ``out`` or ``failed`` (or in neither, if filtering)."""
    both = out + failed
    if len(set(both)) != len(both):
        raise AssertionError(f"{what}: a record is out or failed twice: {sorted(out)} {sorted(failed)}")
    if not set(both) <= set(range(count)):
        raise AssertionError(f"{what}: rows that were never input: {sorted(set(both) - set(range(count)))}")
    if not filtered_allowed and len(both) != count:
        raise AssertionError(f"{what}: lost {sorted(set(range(count)) - set(both))}")


def check(values: list[bytes | None]) -> None:
    count = len(values)
    for schema in (None, SCHEMA):
        for lenient in (False, True):
            table, failures = decode_json(values, schema, lenient=lenient)
            table.validate(full=True)
            partition(f"decode_json(schema={schema is not None}, lenient={lenient})", count,
                      table[ROW_ID].to_pylist(), [row for row, _error in failures], False)
    for steps in PARSERS:
        table, failures = decode_input(values, steps)
        out = run_steps(steps, table, failures)
        partition(steps[0].step.config.format, count, out[ROW_ID].to_pylist(),
                  [failure.row for failure in failures], False)
    table, failures = decode_input(values, STAGE)
    out = run_steps(STAGE, table, failures)
    partition("stage", count, out[ROW_ID].to_pylist(), [failure.row for failure in failures], True)
    produced = [value for batch in output_batches(out, "out", [None] * count, [None] * count)
                for value in batch.values]
    again, refused = decode_json(produced, lenient=True)
    if refused:
        raise AssertionError(f"the stage produced records the next stage refuses: {refused[:3]}")
    user_fields(again).validate(full=True)


def test_one_input(data: bytes) -> None:
    check([None if value == b"\x00null" else value for value in data.split(SEPARATOR)])


def seed_corpus(folder: Path) -> None:
    """Batches of generated records (a few each) as the corpus to start from."""
    folder.mkdir(parents=True, exist_ok=True)
    records = list(generate(400, seed=7, huge_every=10**9))
    for start in range(0, len(records), 4):
        batch = [b"\x00null" if record.value is None else record.value for record in records[start:start + 4]]
        (folder / f"seed-{start:04d}").write_bytes(SEPARATOR.join(batch))


def main() -> None:
    corpus = Path(os.environ.get("FUZZ_CORPUS", "output/fuzz-corpus"))  # output/ is not tracked
    if not corpus.exists():
        seed_corpus(corpus)
    atheris.Setup([*sys.argv, str(corpus)], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
