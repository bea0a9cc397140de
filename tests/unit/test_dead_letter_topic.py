"""One place names a pipeline's default dead-letter topic, for its stages and its sources."""

from __future__ import annotations

import pytest

from streamflow.config import models, parse_pipeline
from streamflow.runtime.sources import source_dead_letter_topic


def pipeline() -> models.PipelineConfig:
    return parse_pipeline({
        "pipeline": "shop",
        "kafka": {"bootstrap": "localhost:9092"},
        "topics": [{"name": "in"}, {"name": "out"}],
        "processors": [{"name": "clean", "input": "in", "output": "out", "steps": []},
                       {"name": "own", "input": "in", "output": "out", "steps": [],
                        "dead_letter": "own.dead"}],
    })


def test_sources_and_stages_share_the_default_dead_letter_topic() -> None:
    config = pipeline()
    clean, own = config.processors
    assert config.dead_letter_topic(clean) == source_dead_letter_topic("shop") == "shop.dlq"
    assert config.dead_letter_topic(own) == "own.dead"


def test_the_default_is_named_in_one_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "default_dead_letter_topic", lambda name: f"{name}.dead-letters")
    config = pipeline()
    assert config.dead_letter_topic(config.processors[0]) == "shop.dead-letters"
    assert source_dead_letter_topic("shop") == "shop.dead-letters"
