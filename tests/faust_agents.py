"""Faust agents the faust-stage tests reference as ``tests.faust_agents:NAME``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any


class ExplodingEventError(ValueError):
    """Raised by :func:`enrich` for events that ask for it."""


async def enrich(stream: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Doubles ``n``; drops events with ``drop``, raises on ``explode``, fans out ``copies``."""
    async for event in stream:
        if event.get("drop"):
            continue
        if event.get("explode"):
            raise ExplodingEventError(f"event {event['n']} asked to explode")
        for copy in range(event.get("copies", 1)):
            yield {**event, "doubled": event["n"] * 2, "copy": copy}


def not_an_agent(event: dict[str, Any]) -> dict[str, Any]:
    """A plain function: rejected as an agent."""
    return event


async def fahrenheit(stream: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    """Adds ``temperature_f`` to generator sensor events."""
    async for event in stream:
        yield {**event, "temperature_f": event["temperature"] * 1.8 + 32}
