"""The README's metric table documents every metric in the catalogue, under its exposed name."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import Counter

from streamflow.metrics.registry import CATALOG

README = (Path(__file__).parents[2] / "README.md").read_text()


def test_every_catalogued_metric_is_documented() -> None:
    exposed = [name + ("_total" if kind is Counter else "") for name, kind, *_ in CATALOG]
    missing = [name for name in exposed if f"`{name}`" not in README]
    assert not missing, f"add these metrics to the README's metric table: {missing}"
