"""The clean workload as a Quix Streams app: an ``Application`` and a ``StreamingDataFrame`` that
parses and checks each record, sends rule breakers to the dead-letter topic and the rest, filtered
and with two derived fields, to the output topic. Run by ``benchmarks.peers.harness`` with
.venv-peers' python; ``--mark FILE`` receives the wall-clock time of the first record consumed."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from cleaning import clean, fields
from quixstreams import Application


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("bootstrap", "input", "output", "dlq", "group", "mark"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--latency", action="store_true", help="declare the send-time field too")
    args = parser.parse_args()
    declared = fields(args.latency)
    mark = Path(args.mark)

    def check(value: bytes) -> dict[str, Any]:
        if not mark.exists():
            mark.write_text(repr(time.time()))
        kind, record = clean(value, declared)
        return {"kind": kind, "record": record, "raw": value}

    app = Application(broker_address=args.bootstrap, consumer_group=args.group,
                      auto_offset_reset="earliest", loglevel="WARNING")
    source = app.topic(args.input, value_deserializer="bytes")
    output = app.topic(args.output, value_serializer="json")
    dead_letters = app.topic(args.dlq, value_serializer="bytes")

    sdf = app.dataframe(source).apply(check)
    sdf[sdf["kind"] == "dlq"].apply(lambda row: row["raw"]).to_topic(dead_letters)
    sdf[sdf["kind"] == "out"].apply(lambda row: row["record"]).to_topic(output)
    app.run()


if __name__ == "__main__":
    main()
