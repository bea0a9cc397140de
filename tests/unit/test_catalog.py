"""`streamflow connectors list|show`: every installed plugin with its package and settings."""

from __future__ import annotations

import json

import pytest
from pydantic import RootModel

from streamflow.cli import main
from streamflow.plugins.catalog import fields, summary_of

SOURCES = ("file", "generator", "http", "kafka", "mqtt", "postgres")


def test_list_shows_every_source_with_package_description_and_settings(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["connectors", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in SOURCES:
        row = next(i for i, line in enumerate(lines) if line.split()[:2] == [name, "source"])
        assert lines[row].split()[2] == "streamflow"
        assert lines[row + 1].startswith(" " * 13) and ": " in lines[row + 1]
    http = lines.index(next(line for line in lines if line.startswith("http ")))
    assert "             token: string | null (default null)" in lines[http + 1:http + 12]
    assert "             max_body_bytes: integer (default 1048576)" in lines[http + 1:http + 12]
    assert any(line.split()[:2] == ["sql", "processor"] for line in lines)
    assert any(line.split()[:2] == ["parquet", "sink"] for line in lines)


def test_list_gives_each_step_its_settings_with_types_and_defaults_in_plain_text(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["connectors", "list"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and ":func:" not in out and ":class:" not in out and "`" not in out
    assert "Emits sensor_event records 0, 1, 2, ... at rate per second." in out
    lines = out.splitlines()

    def settings(step: str) -> list[str]:
        row = next(i for i, line in enumerate(lines) if line.split()[:2] == [step, "processor"])
        end = next((i for i in range(row + 1, len(lines)) if not lines[i].startswith(" ")),
                   len(lines))
        return [line.strip() for line in lines[row + 1:end]]

    assert settings("drop") == ["takes: list[string] (required)"]
    assert settings("filter") == ["takes: string (required)"]
    assert settings("dedupe")[-1] == "max_keys: integer (default 100000)"
    schema = settings("schema")
    assert schema[:2] == ["takes: dict[str, FieldSpec] (required)", "FieldSpec:"]
    assert 'unit: "s" | "ms" (default "ms")' in schema
    assert "storage_options: dict[str, string] (optional)" in out
    assert not any("settings: " in line or "value*" in line for line in lines)


def test_list_json_carries_full_config_schemas(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["connectors", "list", "--json"]) == 0
    listed = {(c["name"], c["kind"]): c for c in json.loads(capsys.readouterr().out)}
    postgres = listed[("postgres", "source")]
    assert postgres["package"] == "streamflow" and postgres["error"] is None
    assert postgres["target"] == "connectors.sources.postgres:PostgresSource"
    assert postgres["config_schema"]["required"] == ["tracking_column"]
    assert listed[("mqtt", "source")]["config_schema"]["properties"]["topics"]["type"] == "array"


def test_show_lists_types_defaults_and_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["connectors", "show", "postgres", "--kind", "source"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("postgres (source) from streamflow: connectors.sources.postgres:PostgresSource")
    assert "  tracking_column: string (required)" in out
    assert '  decimals: "float" | "string" (default "float")' in out
    assert "  poll_interval_s: number (default 1.0)\n      pause after a poll" in out


def test_unknown_name_exits_2_listing_the_installed_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["connectors", "show", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no installed connector is named 'nope'" in err
    assert "http (source)" in err and "parquet (sink)" in err


def test_scalar_settings_and_summaries() -> None:
    assert [(f.name, f.type, f.required) for f in fields(RootModel[list[str]].model_json_schema())] == [
        ("value", "list[string]", True)
    ]
    assert summary_of("Emits rows.\n\nMore detail.") == "Emits rows."
    assert summary_of("Keeps records for which\n    the predicate holds. Others go.") == (
        "Keeps records for which the predicate holds.")
    assert summary_of("Uses :func:`a.b.f`, :class:`~a.b.C` and ``x ...`` with `y`. Then.") == (
        "Uses a.b.f, C and x ... with y.")


def test_a_reader_that_stops_reading_ends_the_command_quietly() -> None:
    """`streamflow connectors show kafka | head -1`: no BrokenPipeError traceback."""
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "streamflow", "connectors", "list"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the command writes anything, as `head` may
    errors = process.stderr.read().decode()
    assert process.wait(timeout=60) == 141
    assert errors == ""
