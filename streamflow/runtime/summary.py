"""The summary a run ends with: per source and stage, the records in, out, filtered and
dead-lettered, and the dead letters by error class with one example each.

On a terminal or in a text log it is a table on stderr (stdout stays the console sink's); with
``--log-format json`` it is the ``data`` of one log line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from streamflow.config.models import PipelineConfig
from streamflow.metrics.registry import DeadLetterReason, PipelineMetrics
from streamflow.metrics.totals import Totals, read_totals

log = logging.getLogger("streamflow.summary")

PLAIN_WIDTH = 120  # of the tables when stderr is no terminal
EXAMPLE_WIDTH = 100  # characters of an example shown in the table (the JSON has it whole)


@dataclass
class ComponentSummary:
    """One source or stage: its kind (source, processor, model, sink), counts and dead letters."""

    name: str
    kind: str
    totals: Totals
    reasons: dict[str, DeadLetterReason] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        totals = self.totals
        return {
            "name": self.name, "kind": self.kind, "in": int(totals.records_in),
            "out": int(totals.records_out), "filtered": int(totals.filtered),
            "dead_lettered": int(totals.dead_lettered),
            "dead_letter_reasons": [
                {"error_class": kind, "step": reason.step, "count": reason.count,
                 "example": reason.example}
                for kind, reason in self.reasons.items()
            ],
        }


@dataclass
class RunSummary:
    """How a run ended and what each of its sources and stages did."""

    pipeline: str
    ended: str
    exit_code: int
    elapsed_s: float
    components: list[ComponentSummary]
    warn_share: float  # dead-lettered shares above it are highlighted
    backfill: dict[str, Any] | None = None  # a bounded run's range, config hash and checkpoint

    def as_dict(self) -> dict[str, Any]:
        return {"pipeline": self.pipeline, "ended": self.ended, "exit_code": self.exit_code,
                "elapsed_s": round(self.elapsed_s, 3),
                "components": [component.as_dict() for component in self.components],
                **({"backfill": self.backfill} if self.backfill is not None else {})}

    def headline(self) -> str:
        return (f"run summary of pipeline {self.pipeline}: {self.ended} (exit {self.exit_code}) "
                f"after {self.elapsed_s:,.1f}s")

    def tables(self) -> Group:
        """The counts table and, when there are dead letters, the table of their reasons."""
        counts = Table(box=box.SIMPLE_HEAD)
        counts.add_column("component")
        counts.add_column("kind")
        for column in ("in", "out", "filtered", "dead-lettered"):
            counts.add_column(column, justify="right")
        for component in self.components:
            totals = component.totals
            dead = Text(_count(totals.dead_lettered))
            if totals.dead_lettered:
                dead.append(f" ({totals.dead_letter_share:.0%})")
                dead.stylize("bold red" if totals.dead_letter_share > self.warn_share else "yellow")
            counts.add_row(Text(component.name), component.kind, _count(totals.records_in),
                           _count(totals.records_out), _count(totals.filtered), dead)
        reasons = [(component.name, kind, reason) for component in self.components
                   for kind, reason in component.reasons.items()]
        if not reasons:
            return Group(counts)
        letters = Table(box=box.SIMPLE_HEAD)
        for column, justify in (("component", "left"), ("error class", "left"),
                                ("step", "left"), ("records", "right"), ("example", "left")):
            letters.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
        for name, kind, reason in reasons:
            example = reason.example if len(reason.example) <= EXAMPLE_WIDTH \
                else reason.example[:EXAMPLE_WIDTH - 1] + "…"
            letters.add_row(Text(name), Text(kind), Text(reason.step), _count(reason.count),
                            Text(example))
        return Group(counts, Text("dead letters by error class", style="bold"), letters)

    def report(self, log_format: str, console: Console | None = None) -> None:
        """As the headline and tables on stderr (``console``), or for JSON logs as one log line."""
        if log_format == "json":
            log.info("%s", self.headline(), extra={"data": self.as_dict()})
            return
        if console is None:  # a terminal's width, else (a log file, CI) a wide one
            console = Console(stderr=True, width=None if sys.stderr.isatty() else PLAIN_WIDTH)
        console.print(Text(self.headline(), style="bold"), soft_wrap=True)
        for name, value in (self.backfill or {}).items():
            console.print(Text(f"backfill {name}: {value}"), soft_wrap=True)
        console.print(self.tables())


def component_kinds(config: PipelineConfig) -> dict[str, str]:
    """Every source and stage of ``config`` by name, with its kind, in pipeline order."""
    kinds = {source.name: "source" for source in config.sources}
    kinds.update({processor.name: "processor" for processor in config.processors})
    kinds.update({model.name: "model" for model in config.models})
    kinds.update({sink.name: "sink" for sink in config.sinks})
    return kinds


def summarize(kinds: Mapping[str, str], metrics: PipelineMetrics, mask: Callable[[str], str]
              ) -> list[ComponentSummary]:
    """The figures of the components in ``kinds``, their examples passed through ``mask``."""
    totals = read_totals(metrics.registry)
    components = []
    for name, kind in kinds.items():
        reasons = metrics.reasons[name].snapshot() if name in metrics.reasons else {}
        for reason in reasons.values():
            reason.example = mask(reason.example)
        components.append(ComponentSummary(name, kind, totals.get(name, Totals()), reasons))
    return components


def _count(value: float) -> str:
    return f"{value:,.0f}"
