"""``streamflow lineage show|trace``: where the rows of a sink's output came from (docs/lineage.md).

OUTPUT names the output: a pipeline file with ``--sink NAME`` (any sink type, Iceberg included),
or directly a Parquet folder or file, a Delta table's folder, a DuckDB file (``--table``) or a
PostgreSQL URI (``--table``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from streamflow.config import load_pipeline
from streamflow.config.loader import connector_settings
from streamflow.config.models import PipelineConfig
from streamflow.ml.checkpoint import CheckpointError
from streamflow.ml.registry import Registry, RegistryError
from streamflow.plugins import SINK_GROUP
from streamflow.runtime.row_lineage import (
    COLUMNS,
    COMPACTED_MANIFESTS,
    MANIFEST_PROPERTY,
    OFFSET,
    ORIGIN_HEADER,
    SHORT_NAMES,
    parse_origin,
    sidecar_path,
)
from streamflow.transport import Transport, TransportError, create_transport, read_until

log = logging.getLogger(__name__)

KINDS = ("parquet", "delta", "duckdb", "postgres", "iceberg")
MAX_HOPS = 64  # a trace stops after this many topics (a cycle of stages cannot loop it forever)


class LineageError(ValueError):
    """The output cannot be read for lineage; the message says why and what to do."""


@dataclass
class Output:
    """A sink's output: its kind and where it is."""

    kind: str
    settings: dict[str, Any]
    pipeline: PipelineConfig | None = None
    label: str = ""


@dataclass
class Hop:
    """One record of a trace, or where the trace found none."""

    topic: str
    partition: int
    offset: int
    retained: bool
    key: str | None = None
    value: str | None = None
    timestamp_ms: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    written_by: list[str] = field(default_factory=list)
    model_rollback: dict[str, Any] | None = None  # a model stage's record: see _model_rollback


def resolve(target: str, sink: str | None = None, table: str | None = None) -> Output:
    """The output ``target`` names (see the module docstring)."""
    path = Path(target)
    if target.endswith((".yaml", ".yml")) and path.is_file():
        return _from_pipeline(load_pipeline(target), sink, target)
    if target.startswith(("postgres://", "postgresql://")):
        return Output("postgres", {"dsn": target, "table": _needed(table, "a PostgreSQL URI"),
                                   "schema": "public", "lineage_table": "streamflow_lineage"},
                      label=f"{target} table {table}")
    if target.startswith("duckdb:") or path.suffix in (".duckdb", ".db"):
        file = target.removeprefix("duckdb:")
        return Output("duckdb", {"path": file, "table": _needed(table, "a DuckDB file"),
                                 "lineage_table": "streamflow_lineage"},
                      label=f"{file} table {table}")
    if (path / "_delta_log").is_dir():
        return Output("delta", {"path": target, "storage_options": {}}, label=target)
    if path.exists():
        return Output("parquet", {"path": target}, label=target)
    raise LineageError(f"{target}: no such file or folder, and not a postgres:// URI")


def _needed(table: str | None, what: str) -> str:
    if table is None:
        raise LineageError(f"name the table of {what} with --table")
    return table


def _from_pipeline(config: PipelineConfig, name: str | None, file: str) -> Output:
    wanted = [sink for sink in config.sinks if sink.type in KINDS]
    if name is not None:
        wanted = [sink for sink in config.sinks if sink.name == name]
        if not wanted:
            raise LineageError(f"{file} has no sink {name!r} (its sinks: "
                               f"{', '.join(sink.name for sink in config.sinks)})")
    elif len(wanted) != 1:
        raise LineageError(f"{file}: name the sink with --sink (one of "
                           f"{', '.join(sink.name for sink in wanted) or 'none'})")
    sink = wanted[0]
    if sink.type not in KINDS:
        raise LineageError(f"sink {sink.name!r} is of type {sink.type}; lineage show and trace "
                           f"read {', '.join(KINDS)} sinks")
    _plugin, settings = connector_settings(sink, SINK_GROUP)
    values = settings.model_dump(by_alias=False)
    if sink.type == "postgres":
        values["schema"] = values.pop("db_schema")
    return Output(sink.type, values, config, f"sink {sink.name} of {file}")


# --- manifests -------------------------------------------------------------------------------


def manifests(output: Output) -> list[dict[str, Any]]:
    """The manifests of ``output``'s commits, oldest first (by commit time)."""
    found = {"parquet": _parquet_manifests, "delta": _delta_manifests,
             "duckdb": _duckdb_manifests, "postgres": _postgres_manifests,
             "iceberg": _iceberg_manifests}[output.kind](output.settings)
    return sorted(found, key=lambda manifest: (manifest.get("committed_at", ""),
                                               manifest.get("file", "")))


def _parquet_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    return sorted(path for path in root.rglob("*.parquet") if not path.name.startswith(("_", ".")))


def _parquet_manifests(settings: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for file in _parquet_files(Path(settings["path"])):
        sidecar = sidecar_path(file)
        if sidecar.is_file():
            manifest = json.loads(sidecar.read_text())
            found += [{**taken, "file": str(file), "compacted_file": taken.get("file")}
                      for taken in manifest[COMPACTED_MANIFESTS]] \
                if COMPACTED_MANIFESTS in manifest else [{**manifest, "file": str(file)}]
    return found


def _delta_manifests(settings: dict[str, Any]) -> list[dict[str, Any]]:
    from deltalake import DeltaTable

    table = DeltaTable(settings["path"], storage_options=settings.get("storage_options") or None)
    return [{**json.loads(commit[MANIFEST_PROPERTY]), "delta_version": commit.get("version")}
            for commit in table.history() if MANIFEST_PROPERTY in commit]


def _duckdb_manifests(settings: dict[str, Any]) -> list[dict[str, Any]]:
    import duckdb

    with duckdb.connect(settings["path"], read_only=True) as connection:
        exists = connection.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
            [settings["lineage_table"]]).fetchone()
        if not exists or not exists[0]:
            return []
        rows = connection.execute(
            f"SELECT manifest FROM {_quote(settings['lineage_table'])} WHERE table_name = ?",
            [settings["table"]]).fetchall()
    return [json.loads(manifest) for (manifest,) in rows]


def _postgres_manifests(settings: dict[str, Any]) -> list[dict[str, Any]]:
    import psycopg
    from psycopg import sql

    with psycopg.connect(settings["dsn"]) as connection:
        name = sql.Identifier(settings["schema"], settings["lineage_table"])
        exists = connection.execute("SELECT to_regclass(%s)",
                                    (name.as_string(connection),)).fetchone()
        if exists is None or exists[0] is None:
            return []
        rows = connection.execute(sql.SQL("SELECT manifest FROM {} WHERE table_name = %s")
                                  .format(name), (settings["table"],)).fetchall()
    return [manifest if isinstance(manifest, dict) else json.loads(manifest)
            for (manifest,) in rows]


def _iceberg_table(settings: dict[str, Any]) -> Any:
    from pyiceberg.catalog import load_catalog

    catalog = settings["catalog"]
    return load_catalog(catalog["name"], **catalog["properties"]).load_table(settings["table"])


def _iceberg_manifests(settings: dict[str, Any]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}  # an upsert commits a delete and an append snapshot
    for snapshot in _iceberg_table(settings).snapshots():
        text = snapshot.summary.get(MANIFEST_PROPERTY) if snapshot.summary is not None else None
        if text is not None:
            manifest = json.loads(text)
            seen.setdefault(manifest["commit_id"], {**manifest,
                                                    "iceberg_snapshot": snapshot.snapshot_id})
    return list(seen.values())


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


# --- rows --------------------------------------------------------------------------------------


def lineage_rows(output: Output) -> pa.Table:
    """The lineage columns of ``output``'s rows (short names: topic, partition, offset...),
    ordered by topic, partition and offset: row N of a trace is the N-th of them (from 0)."""
    table = {"parquet": _parquet_rows, "delta": _delta_rows, "duckdb": _duckdb_rows,
             "postgres": _postgres_rows, "iceberg": _iceberg_rows}[output.kind](output.settings)
    present = [name for name in COLUMNS if name in table.column_names]
    if OFFSET not in present:
        raise LineageError(f"{output.label or output.kind} has no lineage columns: set "
                           "lineage_columns: true on its sink (rows written before have none)")
    table = table.select(present).filter(pc.is_valid(table.column(OFFSET)))
    table = table.rename_columns([SHORT_NAMES[name] for name in present])
    return table.sort_by([("topic", "ascending"), ("partition", "ascending"),
                          ("offset", "ascending")])


def _parquet_rows(settings: dict[str, Any]) -> pa.Table:
    tables = []
    for file in _parquet_files(Path(settings["path"])):
        names = pq.read_schema(file).names
        tables.append(pq.read_table(file, columns=[name for name in COLUMNS if name in names]))
    return pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})


def _delta_rows(settings: dict[str, Any]) -> pa.Table:
    from deltalake import DeltaTable

    table = DeltaTable(settings["path"], storage_options=settings.get("storage_options") or None)
    names = [name for name in COLUMNS if name in pa.schema(table.schema().to_arrow()).names]
    return pa.table(table.to_pyarrow_table(columns=names))


def _duckdb_rows(settings: dict[str, Any]) -> pa.Table:
    import duckdb

    with duckdb.connect(settings["path"], read_only=True) as connection:
        table = _quote(settings["table"])
        names = [name for name in connection.sql(f"SELECT * FROM {table} LIMIT 0").columns
                 if name in COLUMNS]
        if not names:
            return pa.table({})
        return connection.sql(f"SELECT {', '.join(map(_quote, names))} FROM {table}"
                              ).to_arrow_table()


def _postgres_rows(settings: dict[str, Any]) -> pa.Table:
    import psycopg
    from psycopg import sql

    table = sql.Identifier(settings["schema"], settings["table"])
    with psycopg.connect(settings["dsn"]) as connection:
        cursor = connection.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(table))
        names = [column.name for column in cursor.description or [] if column.name in COLUMNS]
        if not names:
            return pa.table({})
        rows = connection.execute(sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(map(sql.Identifier, names)), table)).fetchall()
    return pa.table({name: [row[index] for row in rows] for index, name in enumerate(names)})


def _iceberg_rows(settings: dict[str, Any]) -> pa.Table:
    table = _iceberg_table(settings)
    names = [name for name in COLUMNS if name in table.schema().column_names]
    return table.scan(selected_fields=tuple(names)).to_arrow()


# --- trace -------------------------------------------------------------------------------------


def read_record(transport: Transport, topic: str, partition: int, offset: int,
                timeout_s: float = 10.0) -> Hop:
    """The record at ``offset``, or a :class:`Hop` saying the topic no longer holds it."""
    try:
        reader = transport.reader({(topic, partition): offset})
        try:
            if offset >= reader.end_offsets().get((topic, partition), 0):
                return Hop(topic, partition, offset, False)
        finally:
            reader.close()
        for batch in read_until(transport, {(topic, partition): offset},
                                {(topic, partition): offset + 1}, timeout_s):
            for row, found in enumerate(batch.offsets):
                if found == offset:
                    key, value = batch.keys[row], batch.values[row]
                    return Hop(topic, partition, offset, True,
                               key=None if key is None else key.decode(errors="replace"),
                               value=None if value is None else value.decode(errors="replace"),
                               timestamp_ms=batch.timestamps_ms[row],
                               headers={name: data.decode(errors="replace")
                                        for name, data in batch.headers[row] or []}
                               if batch.headers else {})
    except TransportError:
        pass
    return Hop(topic, partition, offset, False)


def trace(transport: Transport, topic: str, partition: int, offset: int,
          pipeline: PipelineConfig | None = None) -> list[Hop]:
    """The records from (``topic``, ``partition``, ``offset``) back through each record's
    ``sf-origin`` header: the last is a record without one (a source's), or one no longer
    retained."""
    hops: list[Hop] = []
    coordinates: tuple[str, int, int] | None = (topic, partition, offset)
    while coordinates is not None and len(hops) < MAX_HOPS:
        hop = read_record(transport, *coordinates)
        if pipeline is not None:
            hop.written_by = _writers(pipeline, hop.topic)
        hops.append(hop)
        origin = hop.headers.get(ORIGIN_HEADER)
        coordinates = parse_origin(origin.encode()) if hop.retained and origin else None
        if pipeline is not None and coordinates is not None:
            hop.model_rollback = _model_rollback(pipeline, hop.topic, *coordinates)
    return hops


def _model_rollback(config: PipelineConfig, output: str, topic: str, partition: int,
                    offset: int) -> dict[str, Any] | None:
    """The rollback (``streamflow models rollback``) the model stage writing ``output``
    predicted its input record at (``topic``, ``partition``, ``offset``) with, as its registry's
    versions record it; None without one, or where the registry cannot be read from here."""
    for model in config.models:
        if model.output == output:
            registry = Registry.of_stage(model.checkpoint.path, config.pipeline, model.name)
            try:
                return registry.rollback_at(topic, partition, offset)
            except (OSError, RegistryError, CheckpointError, LookupError, TypeError) as exc:
                log.warning("lineage trace: the versions of model stage %s cannot be read (%s)",
                            model.name, exc)
    return None


def _writers(config: PipelineConfig, topic: str) -> list[str]:
    """The components of ``config`` that write ``topic``."""
    return [*(f"source {s.name}" for s in config.sources if s.topic == topic),
            *(f"processor {p.name}" for p in config.processors
              if p.output == topic or any(topic in step.output_topics() for step in p.steps)),
            *(f"model {m.name}" for m in config.models if m.output == topic)]


def _transport(output: Output, bootstrap: str | None, client: str | None) -> Transport:
    kafka = output.pipeline.kafka if output.pipeline is not None else None
    address = bootstrap or (kafka.bootstrap if kafka is not None else None)
    if address is None or address == "embedded":
        raise LineageError("trace reads the topics from Kafka: pass --bootstrap HOST:PORT (an "
                           "embedded broker's topics are gone once its run ended)")
    return create_transport(client or (kafka.client if kafka else "confluent"), address,
                            kafka.client_settings() if kafka is not None else None)


# --- the command -------------------------------------------------------------------------------


def _span(manifest: dict[str, Any]) -> str:
    return f"{manifest.get('started_at')} .. {manifest.get('committed_at')}"


def render_manifests(output: Output, found: list[dict[str, Any]]) -> Iterator[str]:
    """``found`` as text lines."""
    rows = sum(manifest.get("rows", 0) for manifest in found)
    commits = len({manifest.get("commit_id") for manifest in found})
    files = (f" in {len({manifest['file'] for manifest in found})} files"
             if output.kind == "parquet" else "")
    yield f"{output.label or output.kind}: {commits} commits with a manifest{files}, {rows:,} rows"
    for manifest in found:
        versions = manifest.get("model_version")
        model = f"{versions['min']}..{versions['max']}" if versions else "-"
        where = next((f"{name} {manifest[name]}" for name in
                      ("file", "delta_version", "iceberg_snapshot") if name in manifest), "")
        if manifest.get("compacted_file"):
            where += f" (compacted from {manifest['compacted_file']})"
        yield (f"commit {manifest.get('commit_id', '?')[:12]}  rows {manifest.get('rows')}  "
               f"config {manifest.get('config_hash')}  streamflow {manifest.get('streamflow_version')}"
               f"  model_version {model}  span {_span(manifest)}" + (f"  {where}" if where else ""))
        for entry in manifest.get("offsets", []):
            written = ("nothing written" if entry.get("first_offset") is None else
                       f"offsets {entry['first_offset']}..{entry['last_offset']}")
            yield (f"  {entry['topic']}[{entry['partition']}] {written}, {entry.get('rows', 0)} "
                   f"rows (next offset {entry.get('next_offset')})")


def render_trace(hops: list[Hop]) -> Iterator[str]:
    """``hops`` as text lines, each record indented under the one it went into."""
    for depth, hop in enumerate(hops):
        indent, where = "  " * depth, f"{hop.topic}[{hop.partition}]@{hop.offset}"
        by = f" (written by {', '.join(hop.written_by)})" if hop.written_by else ""
        if not hop.retained:
            yield f"{indent}{where}{by}: no longer retained by the topic"
            continue
        end = ""
        if ORIGIN_HEADER not in hop.headers:
            end = (": the source record" if not hop.written_by or any(
                writer.startswith("source ") for writer in hop.written_by) else
                ": no sf-origin header (a window's aggregate or a Faust agent's output, or "
                "written before row lineage was on)")
        yield f"{indent}{where}{by}{end}"
        yield f"{indent}  key {hop.key!r}  timestamp_ms {hop.timestamp_ms}  value {hop.value}"
        if hop.model_rollback:
            rollback = hop.model_rollback
            yield (f"{indent}  predicted by the model adopted in a rollback to version "
                   f"{rollback['version']} (from version {rollback.get('from_version')}, at "
                   f"offsets {rollback.get('at_offsets')}, request {rollback['id']})")


def _show(args: argparse.Namespace) -> int:
    output = resolve(args.output, args.sink, args.table)
    found = manifests(output)
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print("\n".join(render_manifests(output, found)))
    return 0 if found else 1


def _trace(args: argparse.Namespace) -> int:
    output = resolve(args.output, args.sink, args.table)
    rows = lineage_rows(output)
    if not 0 <= args.row < rows.num_rows:
        raise LineageError(f"--row {args.row}: {output.label or output.kind} has "
                           f"{rows.num_rows} rows with lineage columns (0..{rows.num_rows - 1})")
    row = rows.slice(args.row, 1).to_pylist()[0]
    transport = _transport(output, args.bootstrap, args.client)
    hops = trace(transport, row["topic"], row["partition"], row["offset"], output.pipeline)
    if args.json:
        print(json.dumps({"row": row, "trace": [vars(hop) for hop in hops]}, indent=2))
    else:
        print(f"row {args.row} of {output.label or output.kind}: " + ", ".join(
            f"{name} {value}" for name, value in row.items() if value is not None))
        print("\n".join(render_trace(hops)))
    return 0 if hops and hops[-1].retained else 1


def _run(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))
        except LineageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return run


def add_command(commands: Any) -> None:
    """Add ``lineage show`` and ``lineage trace`` to the ``streamflow`` command."""
    lineage = commands.add_parser("lineage", help="where a sink's rows came from (docs/lineage.md)")
    actions = lineage.add_subparsers(dest="lineage_command", required=True)
    for name, handler, text in (
        ("show", _show, "the commits' manifests: offset ranges, rows, config hash, versions"),
        ("trace", _trace, "walk a row back through the stages' topics to its source record"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("output", help="a pipeline file (with --sink), a Parquet or Delta "
                                           "folder, a DuckDB file or a postgres:// URI")
        action.add_argument("--sink", help="the sink of the pipeline file")
        action.add_argument("--table", help="the table, for a DuckDB file or a postgres:// URI")
        action.add_argument("--json", action="store_true", help="as JSON")
        if name == "trace":
            action.add_argument("--row", type=int, required=True, metavar="N",
                                help="the row, from 0, in the order of topic, partition, offset")
            action.add_argument("--bootstrap", metavar="HOST:PORT",
                                help="Kafka to read the topics from (default: the pipeline's)")
            action.add_argument("--client", choices=["confluent", "kafka-python"],
                                help="Kafka client (default: the pipeline's, else confluent)")
        action.set_defaults(handler=_run(handler))
