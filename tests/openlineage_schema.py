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
# streamflow's own facets (no published schema)
CUSTOM_FACETS = {"streamflow_config", "streamflow_model", "streamflow_backfill",
                 "streamflow_model_version"}


def _base(document: dict[str, Any]) -> str:
    """The kind of facet a facet schema defines (``RunFacet``, ``JobFacet``, ``DatasetFacet``...):
    the OpenLineage.json definition its own extends."""
    (definition,) = (d for name, d in document["$defs"].items() if name.endswith("Facet"))
    return str(definition["allOf"][0]["$ref"]).rsplit("/", 1)[1]


def _load() -> tuple[Registry, dict[tuple[str, str], str]]:
    documents = [json.loads(path.read_text()) for path in sorted(SPEC.glob("*.json"))]
    registry = Registry().with_resources(
        (document["$id"], Resource.from_contents(document)) for document in documents)
    facet_schemas = {(_base(document), name): document["$id"] for document in documents
                     if "properties" in document for name in document["properties"]}
    return registry, facet_schemas


REGISTRY, FACET_SCHEMAS = _load()


def _validator(ref: str) -> Draft202012Validator:
    # formats checked as far as jsonschema can without extra packages (uuid: yes; date-time, uri: no)
    return Draft202012Validator({"$ref": ref}, registry=REGISTRY,
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


def _facet_maps(event: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Each facet map of the event with the kind of facet it holds."""
    maps = [("RunFacet", event["run"].get("facets", {})),
            ("JobFacet", event["job"].get("facets", {}))]
    for dataset in [*event.get("inputs", []), *event.get("outputs", [])]:
        maps += [("DatasetFacet", dataset.get("facets", {})),
                 ("InputDatasetFacet", dataset.get("inputFacets", {})),
                 ("OutputDatasetFacet", dataset.get("outputFacets", {}))]
    return maps


def validate_event(event: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``event`` is a valid RunEvent whose every
    facet is valid by its facet schema (or is one of streamflow's custom facets)."""
    _validator(RUN_EVENT).validate(event)
    for kind, facets in _facet_maps(event):
        for name, facet in facets.items():
            if name in CUSTOM_FACETS:
                continue
            assert (kind, name) in FACET_SCHEMAS, f"{kind} {name!r} has no vendored schema"
            _validator(FACET_SCHEMAS[kind, name]).validate({name: facet})
