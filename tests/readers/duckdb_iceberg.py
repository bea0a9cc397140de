"""Print, as JSON, the rows DuckDB's Iceberg reader (``iceberg_scan``) reads from an Iceberg
table's metadata file: ``python duckdb_iceberg.py METADATA_JSON ORDER_BY``.

Run by the Python of ``.venv/duckdb-iceberg`` (``make setup``): DuckDB 1.5.5 with its iceberg and
avro extensions from PyPI, loaded from their wheels (DuckDB would otherwise download them; the
project's own DuckDB is newer than any extension published this way)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import duckdb
import duckdb_extension_avro
import duckdb_extension_iceberg


def extension(module: object, name: str) -> str:
    folder = Path(module.__file__).parent / "extensions" / f"v{duckdb.__version__}"  # type: ignore[attr-defined]
    return str(folder / f"{name}.duckdb_extension")


def main(metadata: str, order_by: str) -> None:
    connection = duckdb.connect(config={"autoinstall_known_extensions": False,
                                        "autoload_known_extensions": False})
    connection.execute(f"LOAD '{extension(duckdb_extension_avro, 'avro')}'")
    connection.execute(f"LOAD '{extension(duckdb_extension_iceberg, 'iceberg')}'")
    relation = connection.sql(f"SELECT * FROM iceberg_scan(?) ORDER BY {order_by}",
                              params=[metadata])
    print(json.dumps({"columns": relation.columns, "rows": relation.fetchall()}, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
