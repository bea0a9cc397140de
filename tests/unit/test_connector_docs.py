"""docs/sources.md and docs/sinks.md document every setting of every built-in connector, in the
connector's own section (as `name` or as `name:` in its YAML example)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from streamflow.plugins.catalog import installed

DOCS = Path(__file__).parents[2] / "docs"

SECTIONS = {  # (kind, connector): (page, heading the section starts with)
    ("source", "http"): ("sources.md", "## http"),
    ("source", "postgres"): ("sources.md", "## postgres"),
    ("source", "mqtt"): ("sources.md", "## mqtt"),
    ("source", "kafka"): ("sources.md", "## kafka"),
    ("source", "file"): ("sources.md", "## file and generator"),
    ("source", "generator"): ("sources.md", "## file and generator"),
    ("sink", "parquet"): ("sinks.md", "## `parquet`"),
    ("sink", "postgres"): ("sinks.md", "## Tables"),
    ("sink", "duckdb"): ("sinks.md", "## Tables"),
    ("sink", "delta"): ("sinks.md", "## `delta`"),
    ("sink", "iceberg"): ("sinks.md", "## `iceberg`"),
    ("sink", "kafka"): ("sinks.md", "## `kafka`"),
    ("sink", "console"): ("sinks.md", "## `console`"),
}


def section(page: str, heading: str) -> str:
    text = (DOCS / page).read_text()
    start = text.index(f"\n{heading}") + 1
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else None]


def settings(kind: str, name: str) -> list[str]:
    """The setting names of an installed connector, as written in a pipeline (aliases)."""
    (info,) = [info for info in installed() if (info.kind, info.name) == (kind, name)]
    assert info.error is None, info.error
    return list(info.config_schema["properties"])


@pytest.mark.parametrize(("kind", "name"), sorted(SECTIONS))
def test_every_setting_is_documented_in_the_connectors_section(kind: str, name: str) -> None:
    text = section(*SECTIONS[(kind, name)])
    missing = [setting for setting in settings(kind, name)
               if f"`{setting}`" not in text and not re.search(rf"^\s*{setting}:", text, re.M)]
    page = SECTIONS[(kind, name)][0]
    assert not missing, f"document these {name} {kind} settings in docs/{page}: {missing}"
