"""Each source's and stage's record counts so far, read from a pipeline's metrics registry.

The progress display, the run summary and the dead-letter share watch read them here, as any
other observer of the registry would.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

# sample name → Totals field, for stages (label "stage") and sources (label "source")
_STAGE_SAMPLES = {
    "streamflow_records_in_total": "records_in",
    "streamflow_records_out_total": "records_out",
    "streamflow_records_filtered_total": "filtered",
    "streamflow_records_dead_lettered_total": "dead_lettered",
    "streamflow_consumer_lag_records": "lag",
}
_SOURCE_SAMPLES = {
    "streamflow_source_records_total": "records_in",
    "streamflow_source_records_dead_lettered_total": "dead_lettered",
}


@dataclass
class Totals:
    """Records a source or stage took in, passed on, filtered and dead-lettered, and its lag.

    A source takes in what it polled and passes on what it published to its topic.
    """

    records_in: float = 0.0
    records_out: float = 0.0
    filtered: float = 0.0
    dead_lettered: float = 0.0
    lag: float = 0.0

    @property
    def dead_letter_share(self) -> float:
        return self.dead_lettered / self.records_in if self.records_in else 0.0


def read_totals(registry: CollectorRegistry) -> dict[str, Totals]:
    """The totals of every source and stage that has metrics in ``registry``, by name."""
    totals: dict[str, Totals] = {}
    sources: set[str] = set()
    for family in registry.collect():
        for sample in family.samples:
            if (name := _STAGE_SAMPLES.get(sample.name)) is not None:
                component = sample.labels["stage"]
            elif (name := _SOURCE_SAMPLES.get(sample.name)) is not None:
                component = sample.labels["source"]
                sources.add(component)
            else:
                continue
            entry = totals.setdefault(component, Totals())
            setattr(entry, name, getattr(entry, name) + sample.value)
    for name in sources:
        source = totals[name]
        source.records_out = source.records_in - source.dead_lettered
    return totals
