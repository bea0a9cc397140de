"""A streamflow pipeline in a process of its own, so that its peak RSS is measured alone:
``python -m benchmarks.isolated SETTINGS.json STAGE [--records N]``. With ``--records`` it
prints ``{"events_per_s": ..., "cpu_us_per_event": ...}`` once STAGE handled N records
(``measure_stage``) and exits; without, it runs until SIGTERM."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import psutil

from benchmarks.common import measure_stage
from benchmarks.processes import tree_cpu_seconds
from streamflow.config import parse_pipeline
from streamflow.runtime.pipeline import PipelineRunner, install_signal_handlers
from streamflow.runtime.process import lean_process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.isolated")
    parser.add_argument("settings", type=Path, help="the pipeline's settings as JSON")
    parser.add_argument("stage")
    parser.add_argument("--records", type=int)
    args = parser.parse_args(argv)
    # as `streamflow run`: its process settings, and river only in the model stages' workers
    lean_process()
    runner = PipelineRunner(parse_pipeline(json.loads(args.settings.read_text()),
                                           resolve_models=False))
    if args.records is None:
        install_signal_handlers(runner)
        runner.run()
    else:
        # the CPU of this process and its workers: the whole pipeline, no broker
        tree = psutil.Process()
        print(json.dumps(measure_stage(runner, args.stage, args.records,
                                       cpu_seconds=lambda: tree_cpu_seconds(tree))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
