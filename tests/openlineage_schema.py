"""Validating lineage events against the official OpenLineage JSON schemas (tests/data/openlineage):
the event against ``RunEvent``, and each facet against its own facet schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SPEC = Path(__file__).parent / "data" / "openlineage"
RUN_EVENT = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunEvent"
CUSTOM_FACETS = {"streamflow_config", "streamflow_model"}  # streamflow's own (no published schema)


def _load() -> tuple[Registry, dict[str, str]]:
    documents = [json.loads(path.read_text()) for path in sorted(SPEC.glob("*.json"))]
    registry = Registry().with_resources(
        (document["$id"], Resource.from_contents(document)) for document in documents)
    facet_schemas = {name: document["$id"] for document in documents
                     for name in document.get("properties", {})}
    return registry, facet_schemas


REGISTRY, FACET_SCHEMAS = _load()


def _validator(ref: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": ref}, registry=REGISTRY)


def _facet_maps(event: dict[str, Any]) -> list[dict[str, Any]]:
    maps = [event["run"].get("facets", {}), event["job"].get("facets", {})]
    for dataset in [*event.get("inputs", []), *event.get("outputs", [])]:
        maps += [dataset.get(key, {}) for key in ("facets", "inputFacets", "outputFacets")]
    return maps


def validate_event(event: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``event`` is a valid RunEvent whose every
    facet is valid by its facet schema (or is one of streamflow's custom facets)."""
    _validator(RUN_EVENT).validate(event)
    for facets in _facet_maps(event):
        for name, facet in facets.items():
            if name in CUSTOM_FACETS:
                continue
            assert name in FACET_SCHEMAS, f"facet {name!r} has no vendored schema"
            _validator(FACET_SCHEMAS[name]).validate({name: facet})
