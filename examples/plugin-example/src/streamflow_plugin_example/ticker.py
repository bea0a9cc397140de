"""A stock ticker: deterministic quotes for a few symbols, resumable from its position.

Quote ``n`` depends only on ``n`` and the settings, so the position (the next quote number) is
all a restart needs to continue with nothing skipped or repeated.
"""

from __future__ import annotations

import json
import math
import time

from pydantic import BaseModel, ConfigDict, Field

from streamflow.plugins import ComponentContext, Source, SourceBatch


class TickerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    symbols: list[str] = Field(["ACME", "GLOBEX", "INITECH"], min_length=1,
                               description="symbols quoted in turn")
    count: int | None = Field(None, ge=0, description="quotes to emit; unbounded when absent")
    rate: float = Field(10.0, ge=0, description="quotes per second; 0 means as fast as possible")
    start_ms: int = Field(1_735_689_600_000, description="event time of quote 0 (epoch ms)")


def quote(config: TickerConfig, number: int) -> dict[str, object]:
    """Quote ``number``: symbols in turn, each price a smooth wave around 100."""
    symbol = config.symbols[number % len(config.symbols)]
    phase = sum(map(ord, symbol))
    price = 100 + 10 * math.sin(number / 25 + phase)
    return {"symbol": symbol, "seq": number, "price": round(price, 2),
            "ts": config.start_ms + number * 1000}


class TickerSource(Source[TickerConfig]):
    """Deterministic stock quotes at a steady rate, keyed by symbol."""

    config_model = TickerConfig

    def __init__(self, config: TickerConfig, context: ComponentContext) -> None:
        super().__init__(config, context)
        self._next = 0
        self._started = time.monotonic()
        self._emitted = 0

    def open(self, position: int | None) -> None:
        self._next = int(position or 0)
        self._started, self._emitted = time.monotonic(), 0

    def poll(self, max_records: int, timeout_s: float) -> SourceBatch | None:
        wanted = max_records
        if self.config.count is not None:
            wanted = min(wanted, self.config.count - self._next)
            if wanted <= 0:
                return None  # bounded and done
        if self.config.rate > 0:
            wanted = min(wanted, int((time.monotonic() - self._started) * self.config.rate) - self._emitted)
            if wanted <= 0:
                time.sleep(min(timeout_s, 1 / self.config.rate))
                return SourceBatch([])
        quotes = [quote(self.config, n) for n in range(self._next, self._next + wanted)]
        self._next += wanted
        self._emitted += wanted
        return SourceBatch([json.dumps(q).encode() for q in quotes],
                           [str(q["symbol"]).encode() for q in quotes])

    def position(self) -> int:
        return self._next
