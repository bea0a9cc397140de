"""Logs: JSON lines on request, and secrets masked in messages and tracebacks."""

from __future__ import annotations

import io
import json
import logging

from streamflow.config import parse_pipeline
from streamflow.runtime.logs import JsonFormatter, Redactor, config_secrets


def logger_with(redactor: Redactor, formatter: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(redactor)
    handler.setFormatter(formatter)
    logger = logging.getLogger(f"test-{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_secrets_from_the_config_are_found() -> None:
    config = parse_pipeline({
        "pipeline": "p",
        "kafka": {"bootstrap": "kafka:9092", "config": {
            "sasl.password": "hunter2-kafka", "sasl.username": "alice",
            "ssl.key.password": "hunter2-key"}},
    })
    assert sorted(config_secrets(config)) == ["hunter2-kafka", "hunter2-key"]


def test_secrets_nested_in_connector_settings_are_found() -> None:
    config = parse_pipeline({
        "pipeline": "p",
        "kafka": {"bootstrap": "kafka:9092"},
        "sources": [{"name": "mirror", "type": "kafka", "topic": "copy",
                     "bootstrap": "other:9092", "topics": ["orders"],
                     "config": {"sasl.password": "hunter2-nested", "sasl.username": "bob"}},
                    {"name": "things", "type": "mqtt", "topic": "raw", "topics": ["sensors/#"],
                     "username": "bob", "password": "hunter2-mqtt"}],
    })
    assert sorted(config_secrets(config)) == ["hunter2-mqtt", "hunter2-nested"]


def test_secrets_never_reach_the_output_in_text_or_json() -> None:
    redactor = Redactor()
    redactor.add(["hunter2-kafka"])
    for formatter in (logging.Formatter("%(levelname)s %(message)s"), JsonFormatter()):
        logger, stream = logger_with(redactor, formatter)
        logger.warning("connecting with %s", "password=hunter2-kafka")
        try:
            raise RuntimeError("auth failed for hunter2-kafka")
        except RuntimeError:
            logger.exception("stage failed")
        output = stream.getvalue()
        assert "hunter2-kafka" not in output
        assert output.count("***") >= 2
        assert "RuntimeError" in output


def test_json_lines_parse() -> None:
    logger, stream = logger_with(Redactor(), JsonFormatter())
    logger.info("hello %s", "world")
    document = json.loads(stream.getvalue())
    assert document["message"] == "hello world" and document["level"] == "INFO"
    assert document["time"].endswith("Z")
