"""Run a benchmark workload and write ``[{system, workload, events_per_s, ...}]`` as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import report
from benchmarks.clean import run_clean
from benchmarks.common import BROKERS, choose_broker
from benchmarks.core import run_core
from benchmarks.dashboard import run_dashboard
from benchmarks.latency import run_latency
from benchmarks.model import run_model
from benchmarks.pipeline_latency import run_pipeline_latency
from benchmarks.scaleout import run_scaleout
from benchmarks.serving import run_serving
from benchmarks.sinks import run_sinks
from benchmarks.windows import run_windows

WORKLOADS = {"core": run_core, "model": run_model, "dashboard": run_dashboard,
             "sinks": run_sinks, "windows": run_windows, "clean": run_clean, "scaleout": run_scaleout}
RATED = {"latency": run_latency, "pipeline-latency": run_pipeline_latency,  # a fixed rate
         "serving": run_serving}
DEFAULT_RATES = {"serving": 500}  # requests per second; the others' records, 5000


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("workload", choices=sorted([*WORKLOADS, *RATED]),
                        help="or `report`: PNG charts of the JSON results (report --help)")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds, each running every system in turn, each round starting one "
                             "system further along; each one's median is kept")
    parser.add_argument("--rate", type=int,
                        help="latency, pipeline-latency: records per second (default 5000); "
                             "serving: requests per second (default 500)")
    parser.add_argument("--seconds", type=float, default=60,
                        help="latency, pipeline-latency, serving: how long to send "
                             "(pipeline-latency adds the soak figures from 120 s on)")
    parser.add_argument("--broker", choices=BROKERS, default="tansu",
                        help="the embedded Tansu or Apache Kafka (KRaft, from `make kafka`'s jars)")
    args = parser.parse_args(argv)
    choose_broker(args.broker)
    if args.workload in RATED:
        rate = args.rate or DEFAULT_RATES.get(args.workload, 5000)
        results = RATED[args.workload](rate, args.seconds, args.repeat)
    else:
        results = WORKLOADS[args.workload](args.records, args.repeat)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
