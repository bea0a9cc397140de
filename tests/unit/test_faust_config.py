"""Configuration of faust stages: field paths and fixes in the errors, the agent reference."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from streamflow.api import Pipeline
from streamflow.config import ConfigError, parse_pipeline
from streamflow.plugins.agents import AgentError, load_agent, require_faust
from tests import faust_agents


def pipeline(processor: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"pipeline": "p", "processors": [{"name": "s", "input": "in", "output": "out",
                                             **processor}], **extra}


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_pipeline(data)
    return caught.value.errors


def test_a_faust_stage_with_an_agent_is_valid() -> None:
    pytest.importorskip("faust")
    config = parse_pipeline(pipeline({"type": "faust", "agent": "tests.faust_agents:enrich"}))
    assert config.processors[0].type == "faust"
    assert config.processors[0].agent == "tests.faust_agents:enrich"


def test_processors_are_native_by_default() -> None:
    config = parse_pipeline(pipeline({"steps": [{"sql": "SELECT * FROM batch"}]}))
    assert config.processors[0].type == "native"
    assert config.processors[0].agent is None


@pytest.mark.parametrize(("processor", "expected"), [
    ({"type": "faust"}, "processors[0].agent: value error, a type: faust stage needs agent"),
    ({"agent": "tests.faust_agents:enrich"},
     "processors[0].agent: value error, only type: faust stages take an agent"),
    ({"type": "faust", "agent": "tests.faust_agents:enrich",
      "steps": [{"sql": "SELECT * FROM batch"}]},
     "processors[0].steps: value error, a type: faust stage runs its agent instead: remove steps"),
    ({"type": "flink"}, "processors[0].type: input should be 'native' or 'faust'"),
])
def test_stage_type_errors_name_the_field(processor: dict[str, Any], expected: str) -> None:
    assert any(line.startswith(expected) for line in errors_of(pipeline(processor))), expected


@pytest.mark.parametrize(("agent", "expected"), [
    ("tests.faust_agents:missing", "cannot import agent 'tests.faust_agents:missing'"),
    ("no_such_module_here:agent", "cannot import agent 'no_such_module_here:agent'"),
    ("tests.faust_agents:not_an_agent", "must be an async generator function"),
    ("not a reference", "must be 'package.module:function'"),
])
def test_unusable_agents_are_config_errors(agent: str, expected: str) -> None:
    pytest.importorskip("faust")
    errors = errors_of(pipeline({"type": "faust", "agent": agent}))
    assert len(errors) == 1
    assert errors[0].startswith("processors[0].agent: ") and expected in errors[0]


def test_faust_stages_refuse_kafka_security_settings() -> None:
    pytest.importorskip("faust")
    data = pipeline({"type": "faust", "agent": "tests.faust_agents:enrich"},
                    kafka={"bootstrap": "kafka:9092",
                           "config": {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN"}})
    (error,) = errors_of(data)
    assert error.startswith("processors[0].type: faust stages connect to Kafka in plaintext")
    plaintext = pipeline({"type": "faust", "agent": "tests.faust_agents:enrich"},
                         kafka={"config": {"security.protocol": "PLAINTEXT"}})
    assert parse_pipeline(plaintext).processors[0].type == "faust"


def test_a_missing_faust_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faust", None)  # what an absent package looks like to import
    with pytest.raises(AgentError, match=r"pip install 'streamflow\[faust\]'"):
        require_faust()
    (error,) = errors_of(pipeline({"type": "faust", "agent": "tests.faust_agents:enrich"}))
    assert error.startswith("processors[0].type: type: faust stages need the faust extra")


def test_load_agent_returns_the_function() -> None:
    assert load_agent("tests.faust_agents:enrich") is faust_agents.enrich


def test_the_python_api_declares_faust_stages() -> None:
    pytest.importorskip("faust")
    config = (Pipeline("p").processor("enrich", input="in", output="out", type="faust",
                                      agent="tests.faust_agents:enrich").build())
    assert (config.processors[0].type, config.processors[0].agent) == (
        "faust", "tests.faust_agents:enrich")
