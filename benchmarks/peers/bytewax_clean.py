"""The clean workload as a Bytewax dataflow: ``KafkaSource`` → map (parse and check) → branch
(dead letters) → filter → ``KafkaSink``. Run by ``benchmarks.peers.harness`` as
``python -m bytewax.run benchmarks/peers/bytewax_clean.py:flow`` with .venv-peers' python; its
settings come from the environment (BENCH_BOOTSTRAP, BENCH_INPUT, BENCH_OUTPUT, BENCH_DLQ,
BENCH_MARK: a file receiving the wall-clock time of the first record consumed, BENCH_LATENCY)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource, KafkaSourceMessage
from bytewax.dataflow import Dataflow
from cleaning import clean, fields

BROKERS = [os.environ["BENCH_BOOTSTRAP"]]
DECLARED = fields(os.environ.get("BENCH_LATENCY") == "1")
MARK = Path(os.environ["BENCH_MARK"])

Checked = tuple[KafkaSourceMessage, str, dict[str, Any] | None]


def check(message: KafkaSourceMessage) -> Checked:
    if not MARK.exists():
        MARK.write_text(repr(time.time()))
    kind, record = clean(message.value, DECLARED)
    return message, kind, record


def dead_letter(checked: Checked) -> KafkaSinkMessage:
    return KafkaSinkMessage(checked[0].key, checked[0].value)


def output(checked: Checked) -> KafkaSinkMessage:
    return KafkaSinkMessage(checked[0].key, json.dumps(checked[2]).encode())


flow = Dataflow("clean")
checked = op.map("check", op.input("in", flow, KafkaSource(BROKERS, [os.environ["BENCH_INPUT"]])),
                 check)
split = op.branch("dead?", checked, lambda item: item[1] == "dlq")
op.output("dlq", op.map("dead_letter", split.trues, dead_letter),
          KafkaSink(BROKERS, os.environ["BENCH_DLQ"]))
kept = op.filter("pressure", split.falses, lambda item: item[1] == "out")
op.output("out", op.map("encode", kept, output), KafkaSink(BROKERS, os.environ["BENCH_OUTPUT"]))
