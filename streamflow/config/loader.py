"""Loading a pipeline file: environment interpolation, YAML, validation with readable errors."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from streamflow.config.models import STEP_KINDS, ConnectorConfig, PipelineConfig
from streamflow.plugins import SINK_GROUP, SOURCE_GROUP, PluginNotFoundError, load

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class ConfigError(Exception):
    """An invalid pipeline; ``errors`` holds one ``path: message`` line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {line}" for line in errors))


def interpolate(text: str, environ: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """Replace ``${VAR}`` and ``${VAR:-default}``; return the text and the unset variables."""
    env = os.environ if environ is None else environ
    missing: list[str] = []

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        missing.append(name)
        return match.group(0)

    return _VARIABLE.sub(substitute, text), missing


def format_location(location: tuple[str | int, ...]) -> str:
    """('sinks', 0, 'path') → 'sinks[0].path'."""
    text = ""
    for part in location:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _strip_union_tags(location: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """Drop the step-kind tag pydantic inserts after ``steps[i]``."""
    parts = list(location)
    for index in range(len(parts) - 2):
        if parts[index] == "steps" and isinstance(parts[index + 1], int):
            if parts[index + 2] in STEP_KINDS:
                del parts[index + 2]
            break
    return tuple(parts)


def _pydantic_errors(error: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[str]:
    lines = []
    for item in error.errors():
        location = _strip_union_tags(item["loc"])
        message = item["msg"][0].lower() + item["msg"][1:] if item["msg"] else ""
        lines.append(f"{format_location((*prefix, *location))}: {message}")
    return lines


def _connector_errors(config: PipelineConfig) -> list[str]:
    errors: list[str] = []
    kinds: list[tuple[str, str, list[ConnectorConfig]]] = [
        ("sources", SOURCE_GROUP, list(config.sources)),
        ("sinks", SINK_GROUP, list(config.sinks)),
    ]
    for section, group, components in kinds:
        for index, component in enumerate(components):
            try:
                plugin = load(group, component.type)
            except PluginNotFoundError as exc:
                errors.append(f"{section}[{index}].type: {exc}")
                continue
            try:
                plugin.config_model.model_validate(component.connector_settings())
            except ValidationError as exc:
                errors.extend(_pydantic_errors(exc, (section, index)))
    return errors


def connector_settings(component: ConnectorConfig, group: str) -> tuple[type[Any], BaseModel]:
    """The connector class for ``component`` and its validated settings."""
    plugin = load(group, component.type)
    return plugin, plugin.config_model.model_validate(component.connector_settings())


def parse_pipeline(data: Any, source: str = "<pipeline>") -> PipelineConfig:
    """Validate already-loaded data (a mapping) into a pipeline, with every error listed."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping with at least 'pipeline:'"])
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _pydantic_errors(exc)) from None
    errors = _connector_errors(config)
    if errors:
        raise ConfigError(source, errors)
    return config


def load_pipeline(path: str | Path, environ: Mapping[str, str] | None = None) -> PipelineConfig:
    """Read, interpolate and validate a pipeline file."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    text, missing = interpolate(raw, environ)
    if missing:
        raise ConfigError(
            str(path),
            [f"${{{name}}}: environment variable is not set (set it, or write "
             f"${{{name}:-default}})" for name in dict.fromkeys(missing)],
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        raise ConfigError(str(path), [f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})"]) from None
    return parse_pipeline(data, str(path))
