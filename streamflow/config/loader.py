"""Loading a pipeline file: environment interpolation, YAML, validation with readable errors."""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from streamflow.config.models import (
    ConnectorConfig,
    ModelConfig,
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

MAX_CONFIG_BYTES = 1 << 20  # a pipeline file larger than this is refused unread
MAX_ALIAS_NODES = 100_000  # YAML aliases may add at most this many nodes to the document

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ConfigError(Exception):
    """An invalid pipeline; ``errors`` holds one ``path: message`` line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__("\n".join(f"{source}: {line}" for line in errors))


class VariableError(ValueError):
    """A ``${VAR:-`` default is never closed by ``}``."""


def _expand(text: str, env: Mapping[str, str], start: int, nested: bool) -> tuple[str, int, list[str]]:
    """Expand ``text[start:]`` up to its end, or up to the ``}`` closing a default when ``nested``;
    return the expansion, the index after it and the unset variables it needed."""
    parts: list[str] = []
    missing: list[str] = []
    index = start
    while index < len(text):
        if nested and text[index] == "}":
            return "".join(parts), index + 1, missing
        name = _NAME.match(text, index + 2) if text.startswith("${", index) else None
        after = name.end() if name else index
        if name is None or (text[after:after + 1] != "}" and not text.startswith(":-", after)):
            parts.append(text[index])
            index += 1
            continue
        default: str | None = None
        needs: list[str] = []
        if text[after] == "}":
            end = after + 1
        else:
            default, end, needs = _expand(text, env, after + 2, nested=True)
        value = env.get(name.group())
        if value is not None and (value != "" or default is None):
            parts.append(value)  # a value is never expanded again
        elif default is not None:
            parts.append(default)
            missing += needs
        else:
            parts.append(text[index:end])
            missing.append(name.group())
        index = end
    if nested:
        raise VariableError("a ${VAR:-default} is not closed by '}'")
    return "".join(parts), index, missing


def interpolate(text: str, environ: Mapping[str, str] | None = None) -> tuple[str, list[str]]:
    """Replace ``${VAR}`` and ``${VAR:-default}`` (defaults may nest) in one string; return it and
    the unset variables. Raises :class:`VariableError` for an unclosed default."""
    expanded, _, missing = _expand(text, os.environ if environ is None else environ, 0, nested=False)
    return expanded, missing


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


def _model_errors(data: dict[str, Any], resolve: bool) -> list[str]:
    """Each model's estimator, drift detector and metrics, resolved as a run resolves them, except
    that an estimator factory is found and checked but not called; without ``resolve``, only what
    needs no river."""
    errors: list[str] = []
    for index, item in _items(data, "models"):
        try:
            model = ModelConfig.model_validate(item)
        except ValidationError:
            continue  # reported by the pipeline model
        where = ("models", index)
        if resolve:
            errors += _river_errors(model, where)
        if model.mlflow and importlib.util.find_spec("mlflow") is None:
            errors.append(f"{format_location((*where, 'mlflow'))}: the mlflow package is not "
                          "installed: pip install 'streamflow[mlflow]', or remove mlflow")
        if resolve:
            errors += _challenger_errors(model, where)
    return errors


def _river_errors(model: ModelConfig, where: tuple[str | int, ...]) -> list[str]:
    """The estimator, drift detector and metrics of ``model``, resolved in river."""
    from streamflow.ml.spec import (  # river is imported only to resolve models
        ModelSpecError,
        build_detector,
        build_estimator,
        build_metric,
        resolve_factory,
    )

    def attempt(where: tuple[str | int, ...], check: Callable[[Any], object], spec: Any) -> list[str]:
        try:
            check(spec)
        except ModelSpecError as exc:
            return [f"{format_location(where)}: {exc}"]
        return []

    estimator_check = resolve_factory if isinstance(model.estimator, str) else build_estimator
    errors = attempt((*where, "estimator"), estimator_check, model.estimator)
    if model.drift:
        errors += attempt((*where, "drift", "detector"), build_detector, model.drift.detector)
    for position, name in enumerate(model.metrics or []):
        errors += attempt((*where, "metrics", position), build_metric, name)
    return errors


def _a(task: str) -> str:
    """``task`` with its indefinite article: a regression, an anomaly."""
    return f"{'an' if task[0] in 'aeiou' else 'a'} {task}"


def _challenger_errors(model: ModelConfig, where: tuple[str | int, ...]) -> list[str]:
    """Each challenger's estimator checked as the stage's own is; a challenger built from river
    names must have the task of the stage's estimator, and the promotion metric must measure
    models of that task."""
    from streamflow.ml.spec import (
        ModelSpecError,
        build_estimator,
        build_metric,
        infer_task,
        resolve_factory,
    )

    def built(spec: Any) -> Any:
        """The estimator of river names; None for a factory, which validation does not call."""
        if isinstance(spec, str):
            resolve_factory(spec)
            return None
        return build_estimator(spec)

    try:
        own = built(model.estimator)
        task = model.task or (infer_task(own) if own is not None else None)
    except ModelSpecError:  # reported with the stage's estimator
        own, task = None, model.task
    errors: list[str] = []
    for index, challenger in enumerate(model.challengers):
        location = (*where, "challengers", index, "estimator")
        try:
            estimator = built(challenger.estimator)
            challenger_task = (model.task or infer_task(estimator)) if estimator is not None else None
        except ModelSpecError as exc:
            errors.append(f"{format_location(location)}: {exc}")
            continue
        if task is not None and challenger_task not in (None, task):
            errors.append(f"{format_location(location)}: {_a(challenger_task)} estimator "
                          f"cannot challenge the stage's {task} estimator")
    if model.promotion is None:
        return errors
    location = (*where, "promotion", "metric")
    try:
        metric = build_metric(model.promotion.metric)
    except ModelSpecError as exc:
        return [*errors, f"{format_location(location)}: {exc}"]
    if task in ("anomaly", "clustering"):
        errors.append(f"{format_location((*where, 'promotion'))}: {_a(task)} stage has no "
                      "target to measure its models against; promotion needs a regression or "
                      "classification stage")
    elif own is not None and not metric.works_with(own):
        errors.append(f"{format_location(location)}: {model.promotion.metric} does not measure "
                      f"{task} models")
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


def parse_pipeline(data: Any, source: str = "<pipeline>",
                   resolve_models: bool = True) -> PipelineConfig:
    """Validate already-loaded data (a mapping) into a pipeline, with every error listed. With
    ``resolve_models``, the names each model gives river are resolved in river, which imports it
    (about 1 s and 65 MB): a run's process does not, since its model stages' workers do, and
    resolve them as they start (:mod:`streamflow.ml.worker`)."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): expected a mapping with at least 'pipeline:'"])
    errors: list[str] = []
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        errors = _pydantic_errors(exc)
    errors += _plugin_config_errors(data) + _model_errors(data, resolve_models)
    if errors:
        raise ConfigError(source, errors)
    return config


def _expanded_size(node: yaml.Node, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """Nodes in ``node`` with every alias expanded, memoized by node: linear in the file."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise yaml.YAMLError("an alias refers to a node that contains it (a recursive structure)")
    open_nodes.add(key)
    children: list[yaml.Node] = []
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [child for pair in node.value for child in pair]
    size = 1 + sum(_expanded_size(child, sizes, open_nodes) for child in children)
    open_nodes.discard(key)
    sizes[key] = size
    return size


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load``, refusing documents whose aliases expand to more than
    :data:`MAX_ALIAS_NODES` extra nodes (an anchor "billion laughs") before building them."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        sizes: dict[int, int] = {}
        if _expanded_size(node, sizes, set()) - len(sizes) > MAX_ALIAS_NODES:
            raise yaml.YAMLError(f"aliases expand the document by more than {MAX_ALIAS_NODES:,} nodes")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _substitute(value: Any, environ: Mapping[str, str], where: tuple[str | int, ...],
                errors: list[str]) -> Any:
    """A copy of loaded YAML with variables replaced in its strings, keys included; each result
    is a plain string, never parsed again."""
    if isinstance(value, str):
        try:
            text, missing = interpolate(value, environ)
        except VariableError as exc:
            errors.append(f"{format_location(where)}: {exc}")
            return value
        errors += [f"{format_location(where)}: ${{{name}}}: environment variable is not set (set it, "
                   f"or write ${{{name}:-default}})" for name in dict.fromkeys(missing)]
        return text
    if isinstance(value, list):
        return [_substitute(item, environ, (*where, index), errors) for index, item in enumerate(value)]
    if isinstance(value, dict):
        result: dict[Any, Any] = {}
        for key, item in value.items():
            name = _substitute(key, environ, (*where, str(key)), errors)
            if name in result:
                errors.append(f"{format_location((*where, str(name)))}: two keys are {name!r} once "
                              "variables are replaced")
            result[name] = _substitute(item, environ, (*where, str(name)), errors)
        return result
    return value


def load_pipeline(path: str | Path, environ: Mapping[str, str] | None = None,
                  resolve_models: bool = True) -> PipelineConfig:
    """Read and parse a pipeline file, replace variables in its strings, and validate it
    (``resolve_models``: see :func:`parse_pipeline`)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(str(path), [f"the file is larger than {MAX_CONFIG_BYTES // 1024} KiB; "
                                      "a pipeline file must be smaller"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), [f"byte {exc.start}: the file is not UTF-8 text"]) from None
    try:
        data = _load_yaml(text)
    except RecursionError:
        raise ConfigError(str(path), ["YAML: the document nests too deeply"]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        hint = '; inside [...] or {...}, quote a variable: "${VAR}"' if "${" in line else ""
        raise ConfigError(str(path), [f"{where}: invalid YAML ({getattr(exc, 'problem', None) or exc}"
                                      f"){hint}"]) from None
    errors: list[str] = []
    data = _substitute(data, os.environ if environ is None else environ, (), errors)
    if errors:
        raise ConfigError(str(path), errors)
    return parse_pipeline(data, str(path), resolve_models)
