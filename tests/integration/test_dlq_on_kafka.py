"""Dead-letter tools on a real broker (`streamflow dlq show|replay`), and `make run` on the
embedded broker: a clean Parquet folder or an announced append, files of each run (each a new
cluster) kept apart, the row count of the folder written, and the dead letters in a file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from streamflow.cli import main
from streamflow.transport import OutgoingBatch, TopicSpec, create_transport
from tests.helpers import read_topic

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"
GOOD = json.dumps({"device_id": "d1", "ts": 1, "temperature": 20.5, "humidity": 40.0,
                   "pressure": 1000.0}).encode()
NO_DEVICE = json.dumps({"ts": 2, "temperature": 1.0, "humidity": 1.0, "pressure": 1.0}).encode()


def test_show_and_replay_the_dead_letters_of_a_stage(
    fresh_broker: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transport = create_transport("confluent", fresh_broker)
    admin = transport.admin()
    admin.create_topics([TopicSpec("sensors.raw", 4), TopicSpec("sensors.fixed", 1)])
    admin.close()
    producer = transport.producer()
    producer.produce([OutgoingBatch(
        "sensors.raw", [GOOD, b"{bad", b"\xff\x00", NO_DEVICE], [b"k0", b"k1", b"k2", b"k3"],
        [None, [("trace", b"t-1")], None, [("trace", b"t-3")]])])
    producer.close()
    env = {**os.environ, "STREAMFLOW_BOOTSTRAP": fresh_broker,
           "QUICKSTART_CHECKPOINTS": str(tmp_path / "checkpoints")}
    completed = subprocess.run(
        [sys.executable, "-m", "streamflow", "run", str(QUICKSTART), "--stage", "clean",
         "--until-idle", "1", "--metrics-port", "0"], env=env, capture_output=True, timeout=180)
    assert completed.returncode == 0, completed.stderr.decode()[-2000:]
    dlq = ["dlq", "show", str(QUICKSTART), "--bootstrap", fresh_broker]

    assert main([*dlq, "--json", "--limit", "0"]) == 0
    letters = {letter["key"]: letter for letter in map(json.loads, capsys.readouterr().out.split("\n")[:-1])}
    assert sorted(letters) == ["k1", "k2", "k3"]
    assert letters["k1"]["value"] == "{bad" and letters["k1"]["headers"]["trace"] == "t-1"
    assert letters["k2"]["value_base64"] == "/wA="
    assert {name: letters["k3"]["headers"][f"streamflow.{name}"] for name in
            ("pipeline", "stage", "step", "error.class", "original.topic")} == {
        "pipeline": "quickstart", "stage": "clean", "step": "schema",
        "error.class": "SchemaViolation", "original.topic": "sensors.raw"}

    assert main([*dlq, "--where", "error.class = 'SchemaViolation'", "--stage", "clean"]) == 0
    text = capsys.readouterr().out
    assert "  streamflow.error.message: required field 'device_id' is missing or null" in text
    assert text.endswith("1 of 1 dead letters in quickstart.dlq shown; "
                         "by error class: SchemaViolation 1\n")

    monkeypatch.delenv("STREAMFLOW_BOOTSTRAP", raising=False)
    assert main(["dlq", "show", str(QUICKSTART)]) == 2
    assert "--dlq-file" in capsys.readouterr().err  # the embedded broker's topics end with it

    replay = ["dlq", "replay", str(QUICKSTART), "--bootstrap", fresh_broker]
    assert main([*replay, "--to", "quickstart.dlq"]) == 2
    assert "dead-letter topic this replay reads" in capsys.readouterr().err
    assert main([*replay, "--to", "sensors.fixed", "--where", "error.class = 'DecodeError'"]) == 0
    assert capsys.readouterr().out == (
        "published 2 dead letters' original records to sensors.fixed\n")
    fixed = read_topic(fresh_broker, "sensors.fixed")
    assert sorted(zip(fixed.keys, fixed.values, fixed.headers, strict=True)) == [
        (b"k1", b"{bad", [("trace", b"t-1")]), (b"k2", b"\xff\x00", None)]


def make_run(tmp_path: Path, output: Path, **extra: str) -> str:
    env = {key: value for key, value in os.environ.items()
           if key not in ("STREAMFLOW_BOOTSTRAP", "MAKEFLAGS", "MFLAGS")}
    env.update({"QUICKSTART_OUTPUT": str(output), "QUICKSTART_COUNT": "400",
                "QUICKSTART_RATE": "0", "QUICKSTART_CHECKPOINTS": str(tmp_path / "checkpoints"),
                "STREAMFLOW_METRICS_PORT": "0", "UNTIL_IDLE": "1", **extra})
    # -o: take the installed environment as it is (the suite runs in it)
    completed = subprocess.run(["make", "-o", ".venv/.installed", "run"], cwd=ROOT, env=env,
                               capture_output=True, timeout=300)
    assert completed.returncode == 0, completed.stderr.decode()[-3000:]
    return completed.stdout.decode()


def parquet_rows(lake: Path) -> int:
    files = [str(path) for path in lake.rglob("*.parquet")]
    return int(duckdb.execute("SELECT count(*) FROM read_parquet(?)", [files]).fetchall()[0][0])


@pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".venv" / "bin").is_dir(),
                    reason="needs make and the .venv that `make setup` creates")
def test_make_run_starts_clean_keeps_reruns_apart_and_counts_what_it_wrote(tmp_path: Path) -> None:
    output = tmp_path / "elsewhere"
    lake = output / "sensors.scored"
    lake.mkdir(parents=True)
    (lake / "stale.parquet").write_bytes(b"from an earlier run")

    first = make_run(tmp_path, output)
    assert f"starting from an empty {lake}" in first
    first_files = {path.name for path in lake.rglob("*.parquet")}
    assert "stale.parquet" not in first_files
    rows = parquet_rows(lake)
    letters = (output / "dead-letters.jsonl").read_text().splitlines()
    assert f"rows in {lake}: {rows}\n" in first
    assert rows + len(letters) == 400 and letters  # every generated event, once
    assert {json.loads(line)["headers"]["streamflow.stage"] for line in letters} == {"clean"}

    second = make_run(tmp_path, output, QUICKSTART_APPEND="1")
    assert f"appending to {lake}: the row count includes earlier runs" in second
    files = {path.name for path in lake.rglob("*.parquet")}
    assert first_files < files  # a new embedded broker is a new cluster: no file overwritten
    clusters = {re.sub(r"^.*\+", "", name) for name in files}
    assert len(clusters) == 2
    again = len((output / "dead-letters.jsonl").read_text().splitlines())
    assert f"rows in {lake}: {rows + 400 - again}\n" in second
    assert parquet_rows(lake) == rows + 400 - again
