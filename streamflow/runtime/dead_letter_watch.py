"""A warning when a source or stage dead-letters more than a share of its records.

Each component's records are measured in blocks of at least ``runtime.dead_letter_warning.records``
(default 1,000): when a block's dead-lettered share is above ``share`` (default 50%), the
component is flagged, a warning is logged (once per component and run), and /readyz names it
until a later block is back at or under the share.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from streamflow.config.models import DeadLetterWarningConfig
from streamflow.metrics.registry import DeadLetterReasons
from streamflow.metrics.totals import Totals

log = logging.getLogger(__name__)


class DeadLetterWatch:
    """Flags components whose latest block of records was mostly dead-lettered."""

    def __init__(self, config: DeadLetterWarningConfig, dead_letter_topics: Mapping[str, str]) -> None:
        self.share = config.share
        self.records = config.records
        self.dead_letter_topics = dict(dead_letter_topics)
        self._block_start: dict[str, tuple[float, float]] = {}  # (in, dead-lettered) at its start
        self._warned: set[str] = set()
        self._flagged: dict[str, str] = {}
        self._lock = threading.Lock()

    def observe(self, totals: Mapping[str, Totals], reasons: Mapping[str, DeadLetterReasons]) -> None:
        """Close the block of each component that has taken in enough records since its last."""
        for name, figures in totals.items():
            start_in, start_dead = self._block_start.get(name, (0.0, 0.0))
            seen = figures.records_in - start_in
            if seen < self.records:
                continue
            self._block_start[name] = (figures.records_in, figures.dead_lettered)
            share = (figures.dead_lettered - start_dead) / seen
            with self._lock:
                if share <= self.share:
                    self._flagged.pop(name, None)
                    continue
                self._flagged[name] = self._describe(name, share, seen, reasons.get(name))
            if name not in self._warned:
                self._warned.add(name)
                log.warning("%s (runtime.dead_letter_warning; /readyz reports it while it lasts)",
                            self._flagged[name])

    def _describe(self, name: str, share: float, seen: float, reasons: DeadLetterReasons | None) -> str:
        text = (f"{name} dead-lettered {share:.0%} of its last {seen:,.0f} records, above "
                f"{self.share:.0%}")
        top = next(iter(reasons.snapshot().items()), None) if reasons else None
        if top is not None:
            kind, reason = top
            text += f"; most often {kind} in step {reason.step}, e.g. {reason.example!r}"
        topic = self.dead_letter_topics.get(name)
        return f"{text}; the records are in {topic}" if topic else text

    def warnings(self) -> dict[str, str]:
        """What is flagged now, by component."""
        with self._lock:
            return dict(self._flagged)
