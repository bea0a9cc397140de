"""Loading a pipeline file: environment interpolation, YAML, validation with readable errors."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from streamflow.config.models import (
    ConnectorConfig,
    PipelineConfig,
    SinkConfig,
    SourceConfig,
    StepConfig,
)
from streamflow.plugins import (
    PROCESSOR_GROUP,
    SINK_GROUP,
    SOURCE_GROUP,
    PluginNotFoundError,
    load,
)
from streamflow.plugins.agents import AgentError, load_agent, require_faust

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


def _pydantic_errors(error: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[str]:
    lines = []
    for item in error.errors():
        location = item["loc"]
        message = item["msg"][0].lower() + item["msg"][1:] if item["msg"] else ""
        lines.append(f"{format_location((*prefix, *location))}: {message}")
    return lines


def _plugin_errors(group: str, name: Any, settings: Any, where: tuple[str | int, ...],
                   name_field: tuple[str | int, ...]) -> list[str]:
    """Errors of one plugin reference: unknown name, or settings its model rejects."""
    if not isinstance(name, str):
        return []  # reported by the pipeline model
    try:
        plugin = load(group, name)
    except PluginNotFoundError as exc:
        return [f"{format_location((*where, *name_field))}: {exc}"]
    try:
        plugin.config_model.model_validate(settings)
    except ValidationError as exc:
        return _pydantic_errors(exc, where)
    return []


def _items(data: dict[str, Any], key: str) -> list[tuple[int, dict[str, Any]]]:
    value = data.get(key)
    if not isinstance(value, list):
        return []
    return [(index, item) for index, item in enumerate(value) if isinstance(item, dict)]


def _plugin_config_errors(data: dict[str, Any]) -> list[str]:
    """Validate connector and step settings on the raw data, so they are reported alongside
    errors elsewhere in the file."""
    errors: list[str] = []
    for section, group in (("sources", SOURCE_GROUP), ("sinks", SINK_GROUP)):
        common = set((SourceConfig if section == "sources" else SinkConfig).model_fields)
        for index, item in _items(data, section):
            settings = {key: value for key, value in item.items() if key not in common}
            errors += _plugin_errors(group, item.get("type"), settings, (section, index), ("type",))
    for stage_index, stage in _items(data, "processors"):
        for step_index, step in _items(stage, "steps"):
            kinds = [key for key in step if key not in StepConfig.model_fields]
            if len(kinds) == 1:
                where = ("processors", stage_index, "steps", step_index, kinds[0])
                errors += _plugin_errors(PROCESSOR_GROUP, kinds[0], step[kinds[0]], where, ())
        if stage.get("type") == "faust":
            errors += _faust_stage_errors(data, stage, ("processors", stage_index))
    return errors


SECURITY_SETTINGS = ("sasl.", "ssl.")


def _faust_stage_errors(data: dict[str, Any], stage: dict[str, Any],
                        where: tuple[str | int, ...]) -> list[str]:
    """The faust extra is installed, the agent imports, and Kafka needs no security settings."""
    try:
        require_faust()
    except AgentError as exc:
        return [f"{format_location((*where, 'type'))}: {exc}"]
    errors = []
    kafka = data.get("kafka")
    client_config = kafka.get("config") if isinstance(kafka, dict) else None
    if isinstance(client_config, dict) and (
        str(client_config.get("security.protocol", "plaintext")).lower() != "plaintext"
        or any(str(key).startswith(SECURITY_SETTINGS) for key in client_config)
    ):
        errors.append(f"{format_location((*where, 'type'))}: faust stages connect to Kafka in "
                      "plaintext and do not apply kafka.config security settings; use a native "
                      "stage (remove type: faust) or a plaintext listener")
    if isinstance(stage.get("agent"), str):
        try:
            load_agent(stage["agent"])
        except AgentError as exc:
            errors.append(f"{format_location((*where, 'agent'))}: {exc}")
    return errors


def step_settings(step: StepConfig) -> tuple[type[Any], BaseModel]:
    """The processor class of ``step`` and its validated settings."""
    plugin = load(PROCESSOR_GROUP, step.kind)
    return plugin, plugin.config_model.model_validate(step.settings)


def connector_settings(component: ConnectorConfig, group: str) -> tuple[type[Any], BaseModel]:
    """The connector class for ``component`` and its validated settings."""
    plugin = load(group, component.type)
    return plugin, plugin.config_model.model_validate(component.connector_settings())


def parse_pipeline(data: Any, source: str = "<pipeline>") -> PipelineConfig:
    """Validate already-loaded data (a mapping) into a pipeline, with every error listed."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping with at least 'pipeline:'"])
    errors: list[str] = []
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        errors = _pydantic_errors(exc)
    errors += _plugin_config_errors(data)
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
