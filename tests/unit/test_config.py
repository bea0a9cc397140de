"""Pipeline files: interpolation, validation errors with field paths, CLI exit codes, Python API."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from streamflow import Pipeline, schema, sql
from streamflow.cli import main
from streamflow.config import ConfigError, load_pipeline
from streamflow.config.loader import MAX_CONFIG_BYTES, connector_settings, format_location, interpolate
from streamflow.plugins import SOURCE_GROUP

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart.yaml"


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def minimal(**overrides: object) -> dict[str, object]:
    return {
        "pipeline": "p",
        "sources": [{"name": "gen", "type": "generator", "topic": "raw", "count": 10}],
        "sinks": [{"name": "lake", "type": "parquet", "input": "raw", "path": "/tmp/x"}],
        **overrides,
    }


def test_interpolation_uses_environment_and_defaults() -> None:
    text, missing = interpolate("a=${A} b=${B:-two} c=${C}", {"A": "one"})
    assert text == "a=one b=two c=${C}"
    assert missing == ["C"]


def test_empty_variable_takes_the_default() -> None:
    assert interpolate("${A:-x}", {"A": ""})[0] == "x"


def test_format_location() -> None:
    assert format_location(("sinks", 0, "path")) == "sinks[0].path"
    assert format_location(()) == "(top level)"


def test_quickstart_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(QUICKSTART)]) == 0
    assert "valid pipeline 'quickstart'" in capsys.readouterr().out


def test_missing_sink_path_is_reported_with_its_field_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = minimal(sinks=[{"name": "lake", "type": "parquet", "input": "raw"}])
    assert main(["validate", str(write(tmp_path, data))]) == 2
    err = capsys.readouterr().err
    assert "sinks[0].path: field required" in err
    assert "pipeline.yaml" in err


def test_every_error_is_listed(tmp_path: Path) -> None:
    data = minimal(
        kafka={"bootstrap": "not a broker", "client": "java"},
        processors=[{"name": "clean", "input": "raw", "output": "clean",
                     "steps": [{"schema": {"x": {"type": "decimal"}}}, {"bogus": 1},
                               {"sql": "SELECT 1", "filter": "x", "on_error": "dlq"},
                               {"sql": "SELECT * FROM batch", "on_error": "ignore"}]}],
    )
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, data))
    text = "\n".join(info.value.errors)
    assert "kafka.bootstrap:" in text and "host:port" in text
    assert "kafka.client:" in text
    assert "processors[0].steps[0].schema.x.type:" in text
    assert "processors[0].steps[1].bogus: unknown type 'bogus'" in text
    assert "processors[0].steps[2]: value error, a step is a mapping with exactly one step kind" in text
    assert "processors[0].steps[3].on_error: input should be 'dlq', 'drop' or 'fail'" in text


def test_unknown_connector_type_names_installed_ones(tmp_path: Path) -> None:
    data = minimal(sinks=[{"name": "lake", "type": "s4", "input": "raw"}])
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, data))
    [error] = info.value.errors
    assert error.startswith("sinks[0].type: unknown type 's4' (installed: ")
    assert {"parquet", "postgres", "duckdb"} <= set(error.split("installed: ")[1][:-1].split(", "))


def test_connector_settings_are_validated_by_the_connector(tmp_path: Path) -> None:
    data = minimal(sources=[{"name": "g", "type": "generator", "topic": "raw", "rate": -1,
                             "colour": "red"}])
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, data))
    assert any(e.startswith("sources[0].rate:") for e in info.value.errors)
    assert any(e.startswith("sources[0].colour: extra inputs") for e in info.value.errors)


def test_unset_variable_and_bad_yaml_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$\{NOPE\}: environment variable is not set"):
        load_pipeline(write(tmp_path, "pipeline: ${NOPE}\n"), environ={})
    with pytest.raises(ConfigError, match=r"line 2, column 1: invalid YAML"):
        load_pipeline(write(tmp_path, "pipeline: [unclosed\n"))


@pytest.mark.parametrize("value", [
    "0x1F", "yes", "012", "null", "1e3", "pa #ss", "[1, 2]", "{a: 1}", "*ref", "&anchor x", "'quoted'",
    "x\n  security.protocol: PLAINTEXT", "x\nsources: []", "${NOT_EXPANDED_AGAIN}",
])
def test_variables_are_substituted_after_parsing_as_plain_strings(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, "pipeline: p\nkafka:\n  config:\n    client.id: ${V}\n    acks: x-${V}-y\n")
    config = load_pipeline(path, environ={"V": value})
    assert config.kafka.config == {"client.id": value, "acks": f"x-{value}-y"}


def test_variables_in_keys_are_substituted_too(tmp_path: Path) -> None:
    path = write(tmp_path, "pipeline: p\nkafka:\n  config:\n    ${KEY}: v\n")
    assert load_pipeline(path, environ={"KEY": "client.id"}).kafka.config == {"client.id": "v"}
    path = write(tmp_path, "pipeline: p\nkafka:\n  config:\n    ${KEY}: v\n    acks: w\n")
    with pytest.raises(ConfigError, match=r"kafka\.config\.acks: two keys are 'acks' once"):
        load_pipeline(path, environ={"KEY": "acks"})


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, "x"), ({"B": "b"}, "b"), ({"A": "a", "B": "b"}, "a"), ({"A": "", "B": ""}, "x"),
])
def test_nested_defaults(tmp_path: Path, environ: dict[str, str], expected: str) -> None:
    path = write(tmp_path, "pipeline: p\nkafka:\n  config:\n    client.id: ${A:-${B:-x}}/${A:-}\n")
    assert load_pipeline(path, environ=environ).kafka.config["client.id"] == (
        f"{expected}/{environ.get('A', '')}")


def test_unset_variable_in_an_unused_default_is_not_needed(tmp_path: Path) -> None:
    path = write(tmp_path, "pipeline: p\nkafka:\n  config:\n    client.id: ${A:-${NOPE}}\n")
    assert load_pipeline(path, environ={"A": "a"}).kafka.config["client.id"] == "a"
    with pytest.raises(ConfigError, match=r"pipeline\.yaml: kafka\.config\.client\.id: \$\{NOPE\}: "
                                          "environment variable is not set"):
        load_pipeline(path, environ={})


def test_unclosed_default_names_the_file_and_the_field(tmp_path: Path) -> None:
    path = write(tmp_path, "pipeline: p\nkafka:\n  config:\n    client.id: '${A:-${B:-x}'\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path, environ={})
    assert str(info.value) == (f"{path}: kafka.config.client.id: a ${{VAR:-default}} is not closed by '}}'")


def test_text_that_is_not_a_variable_is_kept() -> None:
    assert interpolate("$ ${} ${1} ${A B} $A ${A", {"A": "a"}) == ("$ ${} ${1} ${A B} $A ${A", [])


def test_unquoted_variable_in_a_flow_mapping_gets_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "pipeline: p\nkafka: {bootstrap: ${B}}\n")
    with pytest.raises(ConfigError, match=r'line 2.*quote a variable: "\$\{VAR\}"'):
        load_pipeline(path, environ={"B": "h:1"})
    path = write(tmp_path, "pipeline: p\nkafka: {bootstrap: \"${B}\"}\n")
    assert load_pipeline(path, environ={"B": "h:1"}).kafka.bootstrap == "h:1"


def test_oversized_file_is_refused_unread(tmp_path: Path) -> None:
    path = write(tmp_path, "pipeline: p\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10))
    with pytest.raises(ConfigError, match="the file is larger than 1024 KiB"):
        load_pipeline(path)


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_bytes(b"pipeline: \xff\n")
    with pytest.raises(ConfigError, match="byte 10: the file is not UTF-8 text"):
        load_pipeline(path)


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path: Path) -> None:
    lines = ["pipeline: p", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 10) + "]" for level in range(1, 10)]
    path = write(tmp_path, "\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="aliases expand the document by more than 100,000 nodes"):
        load_pipeline(path)
    assert time.monotonic() - started < 2


def test_recursive_alias_and_deep_nesting_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="an alias refers to a node that contains it"):
        load_pipeline(write(tmp_path, "pipeline: p\nloop: &a [*a]\n"))
    with pytest.raises(ConfigError, match="the document nests too deeply"):
        load_pipeline(write(tmp_path, "pipeline: " + "[" * 5000 + "]" * 5000 + "\n"))


def test_ordinary_aliases_still_work(tmp_path: Path) -> None:
    path = write(tmp_path, "pipeline: p\nkafka: &k\n  config: {client.id: '${V}'}\n"
                           "runtime:\n  batch: &b {max_records: 5}\n")
    config = load_pipeline(path, environ={"V": "yes"})
    assert config.runtime.batch.max_records == 5 and config.kafka.config == {"client.id": "yes"}


def model(**overrides: object) -> dict[str, object]:
    return {"name": "m", "input": "raw", "output": "scored", "target": "y", **overrides}


@pytest.mark.parametrize("factory", ["os:system", "builtins:__import__", "builtins:eval", "os:abort",
                                     "sys:exit", "subprocess:run"])
def test_validate_refuses_estimator_factories_outside_user_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], factory: str
) -> None:
    path = write(tmp_path, minimal(models=[model(estimator=factory)]))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"  models[0].estimator: estimator factory {factory!r} is from Python's standard library" in err
    assert "e.g. 'my_models:build'" in err and str(path) in err


def test_validate_resolves_estimators_detectors_and_metrics(tmp_path: Path) -> None:
    data = minimal(models=[
        model(estimator=[{"preprocessing.StandardScaler": {}}, {"linear_model.Nope": {}}],
              drift={"detector": {"drift.ADWIN": {"no_such_parameter": 1}}}, metrics=["MAE", "Nope"]),
        model(name="n", estimator="tests.estimators:no_such_function"),
        model(name="o", estimator="tests.estimators:picky", drift={"detector": {"drift.ADWIN": {}}}),
    ])
    with pytest.raises(ConfigError) as info:
        load_pipeline(write(tmp_path, data))
    errors = info.value.errors
    assert errors[0] == "models[0].estimator: river has no 'linear_model.Nope'"
    assert errors[1].startswith("models[0].drift.detector: drift.ADWIN: ")
    assert errors[2] == "models[0].metrics[1]: river.metrics has no metric 'Nope'"
    assert errors[3].startswith("models[1].estimator: estimator factory 'tests.estimators:no_such_function'")
    assert len(errors) == 4


def test_run_refuses_what_validate_finds_in_models_before_it_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run resolves its models in a child process (streamflow.runtime.model_checks), its own
    never importing river, and refuses to start on the errors validate reports."""
    path = write(tmp_path, minimal(models=[model(
        estimator=[{"preprocessing.StandardScaler": {}}, {"linear_model.Nope": {}}],
        metrics=["MAE", "Nope"])]))
    assert main(["validate", str(path)]) == 2
    refused = capsys.readouterr().err
    assert "  models[0].estimator: river has no 'linear_model.Nope'" in refused
    assert "  models[0].metrics[1]: river.metrics has no metric 'Nope'" in refused
    assert main(["run", str(path)]) == 2
    assert capsys.readouterr().err == refused


def test_duplicate_names_are_rejected(tmp_path: Path) -> None:
    data = minimal(sinks=[{"name": "gen", "type": "parquet", "input": "raw", "path": "/x"}])
    with pytest.raises(ConfigError, match="used twice"):
        load_pipeline(write(tmp_path, data))


def test_run_with_invalid_file_exits_2(tmp_path: Path) -> None:
    assert main(["run", str(write(tmp_path, {"pipeline": "p", "extra": 1}))]) == 2


def test_unknown_stage_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(QUICKSTART), "--stage", "nope"]) == 2
    assert "choose one of: sensors, clean, predict, lake" in capsys.readouterr().err


def test_python_api_builds_the_same_pipeline_as_the_yaml() -> None:
    built = (
        Pipeline("quickstart", bootstrap="embedded")
        .topic("sensors.raw").topic("sensors.clean").topic("sensors.scored")
        .topic("quickstart.dlq", partitions=1)
        .source("sensors", "generator", topic="sensors.raw", count=20000, rate=2000, seed=7,
                malformed_fraction=0.02)
        .processor("clean", input="sensors.raw", output="sensors.clean", steps=[
            schema(device_id="string!", ts="int!", temperature="float!", humidity="float!",
                   pressure="float!", battery="float"),
            sql("SELECT *, temperature * 1.8 + 32 AS temperature_f,\n"
                "       battery < 3.3 AS battery_low\nFROM batch\n"),
        ])
        .model("predict", input="sensors.clean", output="sensors.scored", target="temperature",
               features=["humidity", "pressure"], metrics=["MAE", "RMSE"],
               checkpoint={"path": "./output/checkpoints"}, estimator=[
                   {"preprocessing.StandardScaler": {}},
                   {"linear_model.LinearRegression": {"intercept_lr": 0.1}},
               ])
        .sink("lake", "parquet", input="sensors.scored", path="./output/quickstart")
        .configure("lineage", transport={"type": "file",
                                         "path": "./output/quickstart/lineage.ndjson"})
        .schedule("compact-lake", "*/5 * * * *", compact_parquet={"sink": "lake"})
        .configure("runtime", schedule_state_dir="./output/quickstart/state")
        .configure("metrics", port=9108)
        .build()
    )
    loaded = load_pipeline(QUICKSTART, environ={})
    # ${QUICKSTART_COUNT:-20000} is the string "20000" until the generator's settings model reads it
    assert loaded.sources[0].connector_settings()["count"] == "20000"
    assert (connector_settings(built.sources[0], SOURCE_GROUP)[1]
            == connector_settings(loaded.sources[0], SOURCE_GROUP)[1])
    assert built.model_copy(update={"sources": []}) == loaded.model_copy(update={"sources": []})


def test_topic_specs_cover_every_topic_with_declared_partitions() -> None:
    config = load_pipeline(QUICKSTART, environ={})
    specs = {t.name: t.partitions for t in config.topic_specs()}
    assert specs == {"sensors.raw": 4, "sensors.clean": 4, "sensors.scored": 4, "quickstart.dlq": 1}


def test_exactly_once_covers_model_stages_but_not_a_labels_topic(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = yaml.safe_load(QUICKSTART.read_text())
    pipeline["kafka"]["bootstrap"] = "localhost:9092"
    pipeline["runtime"] = {"guarantee": "exactly_once"}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    assert main(["validate", str(path)]) == 0
    pipeline["models"][0]["labels"] = {"topic": "sensors.labels"}
    path.write_text(yaml.safe_dump(pipeline))
    assert main(["validate", str(path)]) == 2
    assert "exactly_once does not cover predict (a model stage with a labels topic)" \
        in capsys.readouterr().err


def test_mlflow_close_timeout_must_end_before_the_shutdown_timeout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pipeline = yaml.safe_load(QUICKSTART.read_text())
    pipeline["kafka"]["bootstrap"] = "localhost:9092"
    pipeline["models"][0]["mlflow"] = {"tracking_uri": "http://127.0.0.1:5000",
                                       "close_timeout_s": 29}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    assert main(["validate", str(path)]) == 0
    pipeline["models"][0]["mlflow"]["close_timeout_s"] = 30
    path.write_text(yaml.safe_dump(pipeline))
    assert main(["validate", str(path)]) == 2
    assert ("models[0].mlflow.close_timeout_s: 30 s is not shorter than "
            "runtime.shutdown_timeout_s (30 s)") in capsys.readouterr().err
    pipeline["runtime"] = {"shutdown_timeout_s": 31}
    path.write_text(yaml.safe_dump(pipeline))
    assert main(["validate", str(path)]) == 0
