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
        assert lines[row + 1].strip().startswith("settings: ")
    http_settings = next(lines[i + 1] for i, line in enumerate(lines) if line.startswith("http "))
    assert "token," in http_settings and "max_body_bytes" in http_settings
    assert any(line.split()[:2] == ["sql", "processor"] for line in lines)
    assert any(line.split()[:2] == ["parquet", "sink"] for line in lines)


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
