"""The Python API: builds exactly the pipeline object a YAML file describes.

    pipeline = (
        Pipeline("quickstart")
        .source("sensors", "generator", topic="sensors.raw", count=1000)
        .processor("clean", input="sensors.raw", output="sensors.clean",
                   steps=[schema(device_id="string!", temperature="float!")])
        .sink("lake", "parquet", input="sensors.clean", path="./out")
    )
    pipeline.run(until_idle_s=2)
"""

from __future__ import annotations

from typing import Any

from streamflow.config.loader import parse_pipeline
from streamflow.config.models import PipelineConfig
from streamflow.runtime.pipeline import PipelineRunner, RunResult


def schema(**fields: str | dict[str, Any]) -> dict[str, Any]:
    """A schema step; a type ending in ``!`` is required, a mapping is a full field spec:
    ``schema(id="string!", x="float", ts={"type": "timestamp", "unit": "s"})``."""
    return {"schema": {
        name: kind if isinstance(kind, dict) else
        {"type": kind.rstrip("!"), **({"required": True} if kind.endswith("!") else {})}
        for name, kind in fields.items()
    }}


def sql(statement: str) -> dict[str, Any]:
    """A DuckDB SQL step over the batch (table ``batch``)."""
    return {"sql": statement}


def parse(format: str, **options: Any) -> dict[str, Any]:
    """A parse step: ``parse("csv", columns=["id", "x"])``, ``parse("avro", schema={...})``."""
    return {"parse": {"format": format, **options}}


def select(*fields: str) -> dict[str, Any]:
    """Keep only these fields, in this order."""
    return {"select": list(fields)}


def rename(**names: str) -> dict[str, Any]:
    """Rename fields: ``rename(temp="temperature")``."""
    return {"rename": names}


def drop(*fields: str) -> dict[str, Any]:
    """Remove these fields."""
    return {"drop": list(fields)}


def fill_null(**values: Any) -> dict[str, Any]:
    """Replace nulls by constants: ``fill_null(battery=0.0, site="unknown")``."""
    return {"fill_null": values}


def normalize(**fields: str | list[str]) -> dict[str, Any]:
    """Normalise text fields: ``normalize(name=["trim", "lower", "nfc"], code="upper")``."""
    return {"normalize": {name: [ops] if isinstance(ops, str) else ops for name, ops in fields.items()}}


def validate(**rules: dict[str, Any]) -> dict[str, Any]:
    """Per-field rules: ``validate(temperature={"min": -50, "max": 60}, id={"not_null": True})``."""
    return {"validate": rules}


def filter_(predicate: str) -> dict[str, Any]:
    """Keep records matching a DuckDB predicate: ``filter_("temperature > 0")``."""
    return {"filter": predicate}


def python(function: str, mode: str = "record") -> dict[str, Any]:
    """A user function ``"package.module:function"`` per ``record`` or per ``batch``."""
    return {"python": {"function": function, "mode": mode}}


def dedupe(key: str | list[str], window_s: float, **options: Any) -> dict[str, Any]:
    """Drop repeats of ``key`` within ``window_s``: ``dedupe("id", 60, time_field="ts")``."""
    return {"dedupe": {"key": key, "window_s": window_s, **options}}


def enrich(source: str, key: str, **options: Any) -> dict[str, Any]:
    """Join lookup fields by key: ``enrich("csv", "device_id", path="devices.csv")``."""
    return {"enrich": {"source": source, "key": key, **options}}


def route(routes: dict[str, str], default: str | None = None) -> dict[str, Any]:
    """Send records to topics by predicate, first match wins: ``route({"t > 30": "hot"})``."""
    return {"route": {"routes": [{"when": when, "topic": topic} for when, topic in routes.items()],
                      **({"default": default} if default else {})}}


def window(kind: str, *, aggregates: dict[str, str | dict[str, Any]], key: list[str] | None = None,
           **options: Any) -> dict[str, Any]:
    """A processor's ``window`` block; an aggregate is ``"fn"``, ``"fn:field"`` or a mapping:
    ``window("tumbling", size_s=60, key=["device"], aggregates={"n": "count",
    "avg": "mean:temperature", "p95": {"fn": "quantile", "field": "temperature", "q": 0.95}})``."""
    def spec(value: str | dict[str, Any]) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        fn, _, field = value.partition(":")
        return {"fn": fn, **({"field": field} if field else {})}

    return {"kind": kind, "key": key or [], **options,
            "aggregates": {name: spec(value) for name, value in aggregates.items()}}


class Pipeline:
    """A fluent builder; :meth:`build` validates with the same rules and messages as YAML."""

    def __init__(self, name: str, *, bootstrap: str = "embedded", client: str = "confluent",
                 **kafka: Any) -> None:
        self._data: dict[str, Any] = {
            "pipeline": name,
            "kafka": {"bootstrap": bootstrap, "client": client, **kafka},
        }

    def _add(self, section: str, item: dict[str, Any]) -> Pipeline:
        self._data.setdefault(section, []).append(item)
        return self

    def topic(self, name: str, partitions: int = 4, **config: Any) -> Pipeline:
        return self._add("topics", {"name": name, "partitions": partitions, **config})

    def source(self, name: str, type: str, *, topic: str, **settings: Any) -> Pipeline:
        return self._add("sources", {"name": name, "type": type, "topic": topic, **settings})

    def processor(self, name: str, *, input: str, output: str,
                  steps: list[dict[str, Any]] | None = None, **options: Any) -> Pipeline:
        """A processor stage: ``steps``, or ``type="faust", agent="module:function"``."""
        return self._add("processors", {"name": name, "input": input, "output": output,
                                        "steps": steps or [], **options})

    def model(self, name: str, *, input: str, output: str, **options: Any) -> Pipeline:
        return self._add("models", {"name": name, "input": input, "output": output, **options})

    def sink(self, name: str, type: str, *, input: str, **settings: Any) -> Pipeline:
        return self._add("sinks", {"name": name, "type": type, "input": input, **settings})

    def schedule(self, name: str, cron: str, *, on_missed: str | None = None,
                 **job: Any) -> Pipeline:
        """A scheduled job (docs/schedules.md), e.g. ``schedule("compact-lake", "*/5 * * * *",
        compact_parquet={"sink": "lake"})``."""
        self._data.setdefault("schedules", []).append(
            {"name": name, "cron": cron, **({"on_missed": on_missed} if on_missed else {}), **job})
        return self

    def configure(self, section: str, **values: Any) -> Pipeline:
        """Set ``metrics``, ``runtime`` or ``lineage`` options, e.g.
        ``configure("metrics", port=9200)``."""
        self._data.setdefault(section, {}).update(values)
        return self

    def build(self) -> PipelineConfig:
        return parse_pipeline(self._data, source=f"<python pipeline {self._data['pipeline']!r}>")

    def run(self, *, stage: str | None = None, until_idle_s: float | None = None) -> RunResult:
        return PipelineRunner(self.build(), stage=stage, until_idle_s=until_idle_s).run()
