"""``streamflow connectors``: the installed sources, sinks and processor steps, and their settings.

Everything comes from the entry point groups and each plugin's ``config_model``, so a
third-party package shows up here as soon as it is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass, field
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from streamflow.plugins import PROCESSOR_GROUP, SINK_GROUP, SOURCE_GROUP

KINDS = {SOURCE_GROUP: "source", SINK_GROUP: "sink", PROCESSOR_GROUP: "processor"}
EXIT_UNKNOWN = 2


@dataclass
class ConnectorInfo:
    """One installed plugin: what it is, who provides it, and its settings' JSON schema."""

    name: str
    kind: str
    package: str
    target: str
    description: str
    config_schema: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


_ROLE = re.compile(r":[\w.:-]+:`(~?)([^`<]*?)\s*(?:<[^>]*>)?`")  # :func:`x`, :class:`~a.B`
_LITERAL = re.compile(r"``(.+?)``|`([^`]+)`")


def plain(text: str) -> str:
    """``text`` without reStructuredText markup: roles give their target's name (the last
    dotted part after ``~``, as Sphinx shows it) and literals their content."""
    text = _ROLE.sub(lambda m: m[2].rsplit(".", 1)[-1] if m[1] else m[2], text)
    return _LITERAL.sub(lambda m: m[1] or m[2], text)


def summary_of(docstring: str | None) -> str:
    """The first sentence of a docstring, on one line, in plain text."""
    paragraph = " ".join((docstring or "").strip().split("\n\n")[0].split())
    sentence, dot, _ = paragraph.partition(". ")
    return plain(sentence + "." if dot else paragraph)


def _describe(entry: EntryPoint, kind: str) -> ConnectorInfo:
    package = entry.dist.name if entry.dist is not None else "(unknown)"
    info = ConnectorInfo(entry.name, kind, package, entry.value, "")
    try:
        plugin = entry.load()
        info.description = summary_of(plugin.__doc__)
        info.config_schema = plugin.config_model.model_json_schema()
    except Exception as exc:  # a broken plugin is listed with its error, not fatal to the list
        info.error = f"{type(exc).__name__}: {exc}"
    return info


def installed() -> list[ConnectorInfo]:
    """Every installed plugin, sources first, then sinks and processor steps, by name."""
    infos = []
    for group, kind in KINDS.items():
        seen: set[str] = set()
        for entry in sorted(entry_points(group=group), key=lambda e: e.name):
            if entry.name not in seen:  # an editable install can list a distribution twice
                seen.add(entry.name)
                infos.append(_describe(entry, kind))
    return infos


def _type_of(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_type_of(option) for option in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list[{_type_of(schema.get('items', {}))}]"
    if kind == "object" and "additionalProperties" in schema:
        values = schema["additionalProperties"]
        return f"dict[str, {_type_of(values) if isinstance(values, dict) else 'any'}]"
    return str(kind)


@dataclass
class FieldInfo:
    name: str
    type: str
    required: bool
    default: Any
    description: str
    has_default: bool = True  # False: optional, with no default in the schema (a factory's)


def _description(schema: dict[str, Any]) -> str:
    return plain(" ".join(schema.get("description", "").split()))


def fields(schema: dict[str, Any]) -> list[FieldInfo]:
    """The settings of a config schema; a scalar (root) model is one field named ``value``.
    Descriptions are plain text."""
    if "properties" not in schema:
        if not schema:
            return []
        return [FieldInfo("value", _type_of(schema), True, None, _description(schema))]
    required = set(schema.get("required", []))
    return [
        FieldInfo(name, _type_of(spec), name in required, spec.get("default"),
                  _description(spec), "default" in spec)
        for name, spec in schema["properties"].items()
    ]


def _setting_lines(schema: dict[str, Any], indent: str, describe: bool) -> list[str]:
    """One line per setting of ``schema`` (``name: type (required | default X)``, a scalar
    model's as ``takes: type``), each followed by its description when ``describe``; then the
    settings of each model the schema refers to (``FieldSpec``, ``Route``, ...) likewise."""
    lines = []
    for setting in fields(schema):
        default = ("required" if setting.required else
                   f"default {json.dumps(setting.default)}" if setting.has_default else "optional")
        name = "takes" if "properties" not in schema else setting.name
        lines.append(f"{indent}{name}: {setting.type} ({default})")
        if describe and setting.description:
            lines.append(f"{indent}    {setting.description}")
    for name, definition in schema.get("$defs", {}).items():
        lines.append(f"{indent}{name}:")
        lines += _setting_lines(definition, indent + "  ", describe)
    return lines


def render_list(infos: list[ConnectorInfo]) -> str:
    """One line per plugin, then its settings with their types and defaults."""
    lines = []
    for info in infos:
        summary = f"BROKEN: {info.error}" if info.error else info.description
        lines.append(f"{info.name:<12} {info.kind:<10} {info.package:<28} {summary}")
        lines += _setting_lines(info.config_schema, " " * 13, describe=False)
    return "\n".join(lines)


def render_show(info: ConnectorInfo) -> str:
    """Everything about one plugin: provenance and every setting with type, default and meaning."""
    lines = [f"{info.name} ({info.kind}) from {info.package}: {info.target}"]
    if info.error:
        lines.append(f"  cannot be loaded: {info.error}")
        return "\n".join(lines)
    if info.description:
        lines.append(f"  {info.description}")
    settings = _setting_lines(info.config_schema, "  ", describe=True)
    lines.append("settings:" if settings else "settings: none")
    return "\n".join(lines + settings)


def _list(args: argparse.Namespace) -> int:
    infos = installed()
    if args.json:
        print(json.dumps([asdict(info) for info in infos], indent=2, default=str))
    else:
        print(render_list(infos))
    return 0


def _show(args: argparse.Namespace) -> int:
    infos = installed()
    matches = [i for i in infos if i.name == args.name and args.kind in (None, i.kind)]
    if not matches:
        known = ", ".join(f"{i.name} ({i.kind})" for i in infos)
        print(f"error: no installed connector is named {args.name!r}; installed: {known}",
              file=sys.stderr)
        return EXIT_UNKNOWN
    if args.json:
        print(json.dumps([asdict(info) for info in matches], indent=2, default=str))
    else:
        print("\n\n".join(render_show(info) for info in matches))
    return 0


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``streamflow connectors list|show`` on the CLI's subcommands."""
    connectors = commands.add_parser("connectors", help="installed sources, sinks and processor steps")
    actions = connectors.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every installed connector with its settings")
    listing.add_argument("--json", action="store_true", help="JSON, with full config schemas")
    listing.set_defaults(handler=_list)
    show = actions.add_parser("show", help="one connector in full; exit 2 if none has that name")
    show.add_argument("name")
    show.add_argument("--kind", choices=sorted(KINDS.values()), help="when names collide")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_show)
