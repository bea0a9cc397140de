"""``streamflow models list|show|export|tag|untag|rollback``: a model stage's registry.

They read and write the stage's checkpoint store only, so they work on a running pipeline as on
a stopped one (see :mod:`streamflow.ml.registry`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streamflow.config import load_pipeline
from streamflow.config.models import ModelConfig, PipelineConfig
from streamflow.ml.checkpoint import CheckpointError
from streamflow.ml.registry import Registry, RegistryError, Version

EXIT_ERROR = 1


def stage_registry(file: str, stage: str | None) -> Registry:
    """The registry of model stage ``stage`` of the pipeline in ``file`` (the only one if None)."""
    config = load_pipeline(file)
    model = model_stage(config, file, stage)
    return Registry.of_stage(model.checkpoint.path, config.pipeline, model.name)


def model_stage(config: PipelineConfig, file: str, stage: str | None) -> ModelConfig:
    """Model stage ``stage`` of ``config`` (read from ``file``; the only one if None)."""
    names = [model.name for model in config.models]
    if stage is None and len(names) == 1:
        stage = names[0]
    [model] = [model for model in config.models if model.name == stage] or [None]
    if model is None:
        raise RegistryError(f"{file} has no model stage {stage!r}; its model stages: "
                            f"{', '.join(names) or 'none'}" if stage else
                            f"{file} has several model stages: name one with --stage "
                            f"({', '.join(names)})")
    return model


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _summary(version: Version) -> dict[str, str]:
    parts = version.metadata.get("partitions", {}).values()
    offsets = ", ".join(f"{topic}/{part.get('partition')}:{offset}" for part in parts
                        for topic, offset in part.get("next_offsets", {}).items())
    metrics = ", ".join(f"{name}={values['cumulative']:.4g}/{values['rolling']:.4g}"
                        for part in parts for name, values in part.get("metrics", {}).items())
    rollbacks = {part["rollback"]["version"] for part in parts if part.get("rollback")}
    champions = ", ".join(f"{part.get('partition')}:{name}" for part in parts
                          for name, model in part.get("models", {}).items() if model["champion"])
    return {"version": str(version.number), "created (UTC)": _when(version.metadata["created_at"]),
            "learned": str(version.records_learned), "offsets": offsets,
            "metrics (cumulative/rolling)": metrics, "champion": champions,
            "from rollback to": ",".join(map(str, sorted(rollbacks))),
            "tags": ",".join(version.tags)}


def list_versions(args: argparse.Namespace) -> int:
    registry = stage_registry(args.file, args.stage)
    versions = registry.versions()
    request = registry.rollback_request()
    if args.json:
        for version in versions:
            print(json.dumps({**version.metadata, "tags": version.tags}))
        return 0
    if not versions:
        print(f"no versions in {registry.store} (the stage has not checkpointed yet)")
        return 0
    rows = [_summary(version) for version in versions]
    if not any(row["champion"] for row in rows):  # a stage without challengers
        for row in rows:
            del row["champion"]
    widths = {column: max(len(column), *(len(row[column]) for row in rows)) for column in rows[0]}
    print("  ".join(column.ljust(width) for column, width in widths.items()).rstrip())
    for row in rows:
        print("  ".join(row[column].ljust(width) for column, width in widths.items()).rstrip())
    if request is not None:
        print(f"rollback to version {request.version} requested at {_when(request.requested_at)} "
              "UTC")
    return 0


def show(args: argparse.Namespace) -> int:
    registry = stage_registry(args.file, args.stage)
    number = registry.resolve(args.version)
    version = registry.version(number)
    try:
        registry.verify(number)
        integrity = "verified"
    except (CheckpointError, OSError) as exc:
        integrity = f"refused: {exc}"
    print(json.dumps({**version.metadata, "tags": version.tags, "integrity": integrity},
                     indent=2))
    return 0 if integrity == "verified" else EXIT_ERROR


def export(args: argparse.Namespace) -> int:
    registry = stage_registry(args.file, args.stage)
    number = registry.resolve(args.version)
    digest = registry.export(number, args.output)
    print(f"version {number} written to {args.output}\nsha256 {digest}\n"
          f"load it with streamflow.ml.load({str(args.output)!r}, sha256={digest!r})")
    return 0


def tag(args: argparse.Namespace) -> int:
    registry = stage_registry(args.file, args.stage)
    number = registry.resolve(args.version)
    moved_from = registry.tag(number, args.name)
    print(f"version {number} tagged {args.name}"
          + (f" (moved from version {moved_from})" if moved_from is not None else ""))
    return 0


def untag(args: argparse.Namespace) -> int:
    registry = stage_registry(args.file, args.stage)
    print(f"tag {args.name} removed from version {registry.untag(args.name)}")
    return 0


def rollback(args: argparse.Namespace) -> int:
    registry = stage_registry(args.file, args.stage)
    request = registry.request_rollback(registry.resolve(args.version))
    print(f"rollback to version {request.version} requested: a running stage adopts it between "
          "two batches (within about a second), a stopped one when it next starts; its "
          "partitions keep their offsets")
    return 0


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (RegistryError, CheckpointError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR

    return run


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``streamflow models ...`` on the CLI's subcommands."""
    models = commands.add_parser(
        "models", help="a model stage's versions: list, show, export, tag, roll back")
    actions = models.add_subparsers(dest="action", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("file", help="pipeline YAML file")
    common.add_argument("--stage", help="the model stage (needed if the pipeline has several)")
    version = argparse.ArgumentParser(add_help=False)
    version.add_argument("version", help="a version number, a tag, or latest")
    specs: list[tuple[str, str, list[argparse.ArgumentParser], Callable[..., int],
                      list[tuple[tuple[str, ...], dict[str, Any]]]]] = [
        ("list", "the versions kept, oldest first", [common], list_versions,
         [(("--json",), {"action": "store_true", "help": "one JSON object a line per version"})]),
        ("show", "a version's metadata, its files' integrity checked", [common, version], show, []),
        ("export", "write a version as one file that streamflow.ml.load or pickle reads",
         [common, version], export,
         [(("-o", "--output"), {"type": Path, "required": True, "help": "the file to write"})]),
        ("tag", "tag a version (kept by retention; a tag moves from the version that had it)",
         [common, version], tag, [(("name",), {"help": "the tag"})]),
        ("untag", "remove a tag", [common], untag, [(("name",), {"help": "the tag"})]),
        ("rollback", "have the stage adopt a version at a batch boundary (or at its next start)",
         [common, version], rollback, []),
    ]
    for name, text, parents, handler, arguments in specs:
        parser = actions.add_parser(name, parents=parents, help=text)
        for flags, options in arguments:
            parser.add_argument(*flags, **options)
        parser.set_defaults(handler=_guarded(handler))
