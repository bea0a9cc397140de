"""Semantic validation: SQL, fields, models, sources and topics checked before a run, each finding
with its file, field path and a hint; `validate --strict` and `run` act on them. No broker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from streamflow.cli import main
from streamflow.config import load_pipeline, parse_pipeline
from streamflow.runtime.semantics import Finding, check_pipeline

ROOT = Path(__file__).parents[2]
EXAMPLES = [*sorted(path for path in (ROOT / "examples").glob("*.yaml")
                    if not path.name.endswith(".test.yaml")), ROOT / "docker" / "pipeline.yaml"]
SCHEMA = {"schema": {"id": {"type": "string"}, "temperature": {"type": "float"},
                     "humidity": {"type": "float"}}}


def pipeline(*steps: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A generator source → one processor stage with ``steps`` → a sink, changed by ``sections``."""
    return {
        "pipeline": "p",
        "sources": [{"name": "gen", "type": "generator", "topic": "raw", "count": 10}],
        "processors": [{"name": "clean", "input": "raw", "output": "clean", "steps": list(steps)}],
        "sinks": [{"name": "lake", "type": "parquet", "input": "clean", "path": "/tmp/unused"}],
        **sections,
    }


def check(data: dict[str, Any]) -> list[Finding]:
    return check_pipeline(parse_pipeline(data), "p.yaml")


def only(findings: list[Finding], severity: str = "error") -> Finding:
    assert len(findings) == 1, findings
    assert findings[0].severity == severity and findings[0].file == "p.yaml"
    return findings[0]


def write(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_the_examples_have_no_findings(example: Path) -> None:
    assert check_pipeline(load_pipeline(example, environ={}), str(example)) == []


def test_a_sql_typo_is_an_error_at_its_step() -> None:
    found = only(check(pipeline(SCHEMA, {"sql": "SELEC * FROM batch"})))
    assert found.path == "processors[0].steps[1].sql"
    assert found.message.startswith("SQL syntax: ") and '"SELEC"' in found.message
    assert "SELEC * FROM batch" in found.hint


def test_an_unknown_sql_function_is_an_error_with_duckdbs_suggestion() -> None:
    found = only(check(pipeline(SCHEMA, {"filter": "lenght(id) > 2"})))
    assert "lenght" in found.message and "length" in found.hint


def test_a_filter_on_a_missing_field_is_an_error_with_a_suggestion() -> None:
    found = only(check(pipeline(SCHEMA, {"filter": "temprature > 30"})))
    assert found.path == "processors[0].steps[1].filter"
    assert found.message == "field 'temprature' is not a field of the records here"
    assert found.hint == "did you mean 'temperature'?"


def test_a_field_used_but_never_declared_is_a_warning() -> None:
    findings = check(pipeline({"filter": "humidity > 3"}, {"sql": "SELECT *, upper(name) AS n FROM batch"}))
    assert [(f.severity, f.path, f.message) for f in findings] == [
        ("warning", "processors[0].steps[0].filter", "field 'humidity' is used but never declared"),
        ("warning", "processors[0].steps[1].sql", "field 'name' is used but never declared"),
    ]
    assert "schema step" in findings[0].hint


def test_fields_follow_the_steps() -> None:
    """Fields a step adds, renames, drops or selects are known to the steps after it."""
    steps = [SCHEMA, {"sql": "SELECT *, temperature * 1.8 + 32 AS fahrenheit FROM batch"},
             {"rename": {"humidity": "moisture"}}, {"drop": ["id"]}, {"filter": "fahrenheit > moisture"}]
    assert check(pipeline(*steps)) == []
    assert only(check(pipeline(*steps, {"filter": "id IS NULL"}))).path == "processors[0].steps[5].filter"
    assert only(check(pipeline(*steps, {"select": ["humidity"]}))).hint == \
        "the fields here are temperature, moisture, fahrenheit"


def test_a_select_naming_its_columns_closes_an_open_schema() -> None:
    findings = check(pipeline({"sql": "SELECT _sf_row, CAST(a AS INT) AS b FROM batch"},
                              {"filter": "a > 1"}))
    assert [(f.severity, f.path) for f in findings] == [
        ("warning", "processors[0].steps[0].sql"), ("error", "processors[0].steps[1].filter")]
    assert findings[1].hint == "the fields here are b"


def test_sql_dropping_the_row_column_is_an_error() -> None:
    found = only(check(pipeline(SCHEMA, {"sql": "SELECT id FROM batch"})))
    assert "_sf_row" in found.message and "SELECT *" in found.hint


def test_field_steps_name_existing_fields() -> None:
    for step, path in [({"rename": {"humidty": "h"}}, "rename.humidty"), ({"validate": {"tempo": {"min": 0}}},
                       "validate.tempo"), ({"dedupe": {"key": ["idd"], "window_s": 60}}, "dedupe.key[0]")]:
        found = only(check(pipeline(SCHEMA, step)))
        assert found.path == f"processors[0].steps[1].{path}"


def test_a_step_that_does_not_fit_a_declared_type_is_an_error() -> None:
    found = only(check(pipeline(SCHEMA, {"normalize": {"temperature": ["trim"]}})))
    assert found.message == "normalize: field 'temperature' is double, not text"


def test_after_a_python_or_enrich_step_fields_are_not_checked(tmp_path: Path) -> None:
    python = {"python": {"function": "tests.step_functions:add_one_batch", "mode": "batch"}}
    assert check(pipeline(SCHEMA, python, {"filter": "anything > 1"})) == []
    lookup = tmp_path / "sites.csv"  # not there: validate builds no enrich step, so reads nothing
    enrich = {"enrich": {"source": "csv", "path": str(lookup), "key": "idd"}}
    found = only(check(pipeline(SCHEMA, enrich, {"filter": "site IS NOT NULL"})))
    assert (found.path, found.hint) == ("processors[0].steps[1].enrich.key", "did you mean 'id'?")


def test_a_model_target_typo_is_an_error_with_a_suggestion() -> None:
    model = {"name": "m", "input": "clean", "output": "scored", "target": "temperatur",
             "features": ["humidity", "fahrenheit"], "estimator": [{"linear_model.LinearRegression": {}}]}
    steps = [SCHEMA, {"sql": "SELECT *, temperature * 1.8 + 32 AS fahrenheit FROM batch"}]
    found = only(check(pipeline(*steps, models=[model])))
    assert (found.path, found.hint) == ("models[0].target", "did you mean 'temperature'?")
    model["features"] = ["humidty"]
    assert [f.path for f in check(pipeline(*steps, models=[{**model, "target": "temperature"}]))] == \
        ["models[0].features[0]"]


def test_a_model_on_records_nobody_declared_gets_a_warning() -> None:
    data = pipeline(models=[{"name": "m", "input": "raw", "output": "scored", "target": "y",
                             "estimator": [{"linear_model.LinearRegression": {}}]}])
    found = only(check(data), "warning")
    assert found.path == "models[0].target" and found.message == "target 'y' is used but never declared"


def test_fields_flow_from_stage_to_stage_through_windows_and_models() -> None:
    window = {"kind": "tumbling", "size_s": 60, "key": ["id"], "time_field": "temprature",
              "aggregates": {"avg": {"fn": "mean", "field": "humidity"}}}
    classifier = {"name": "m", "input": "clean", "output": "scored", "target": "avg",
                  "estimator": [{"linear_model.LogisticRegression": {}}]}
    after = {"name": "after", "input": "scored", "output": "final",
             "steps": [{"filter": "probabilities IS NOT NULL AND window_start IS NOT NULL AND avgg > 0"}]}
    data = pipeline(SCHEMA, models=[classifier])
    data["processors"][0]["window"] = window
    data["processors"].append(after)
    assert [(f.path, f.hint) for f in check(data)] == [
        ("processors[0].window.time_field", "did you mean 'temperature'?"),
        ("processors[1].steps[0].filter", "did you mean 'avg'?"),
    ]


def test_a_file_source_path_must_match_a_file_unless_followed(tmp_path: Path) -> None:
    source = {"name": "csvfile", "type": "file", "topic": "raw", "format": "csv",
              "path": str(tmp_path / "*.csv")}
    found = only(check(pipeline(sources=[source])))
    assert found.path == "sources[0].path" and "matches no file" in found.message
    assert "follow: true" in found.hint
    assert check(pipeline(sources=[{**source, "follow": True}])) == []
    # A stage run alone (--stage) may see only its own files: other sources' are not checked.
    config = parse_pipeline(pipeline(sources=[source]))
    assert check_pipeline(config, "p.yaml", stage="clean") == []
    assert len(check_pipeline(config, "p.yaml", stage="csvfile")) == 1
    (tmp_path / "data.csv").write_text("a\n1\n")
    assert check(pipeline(sources=[source])) == []


def test_a_sink_whose_input_nothing_writes_is_an_error() -> None:
    data = pipeline(sinks=[{"name": "lake", "type": "parquet", "input": "claen", "path": "/tmp/x"}])
    found = only(check(data))
    assert found.path == "sinks[0].input" and found.message == "nothing in the pipeline writes topic 'claen'"
    assert found.hint.startswith("did you mean 'clean'? ") and "external: true" in found.hint
    data["topics"] = [{"name": "claen", "external": True}]
    assert check(data) == []


def test_routes_dead_letters_and_labels_are_topics_too() -> None:
    route = {"route": {"routes": [{"when": "temperature > 30", "topic": "hot"}]}}
    sinks = [{"name": name, "type": "parquet", "input": topic, "path": "/tmp/x"}
             for name, topic in [("hot", "hot"), ("dead", "p.dlq"), ("out", "clean")]]
    model = {"name": "m", "input": "clean", "output": "scored", "target": "temperature",
             "estimator": [{"linear_model.LinearRegression": {}}], "labels": {"topic": "labels"}}
    found = only(check(pipeline(SCHEMA, route, sinks=sinks, models=[model])))
    assert found.path == "models[0].labels.topic"


def test_validate_prints_warnings_and_strict_makes_them_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, pipeline({"filter": "humidity > 3"}))
    assert main(["validate", path]) == 0
    captured = capsys.readouterr()
    assert f"warning: {path}: processors[0].steps[0].filter: field 'humidity' is used but never " \
        "declared (hint: declare it in a schema step upstream" in captured.err
    assert "valid pipeline 'p'" in captured.out
    assert main(["validate", "--strict", path]) == 2
    err = capsys.readouterr().err
    assert f"invalid pipeline {path}:\n  processors[0].steps[0].filter: field 'humidity'" in err


def test_validate_and_run_refuse_errors_and_list_the_warnings_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, pipeline({"filter": "humidity > 3"}, {"sql": "SELEC * FROM batch"}))
    for command in (["validate"], ["run", "--metrics-port", "0"]):
        assert main([*command, path]) == 2
        err = capsys.readouterr().err
        assert "  processors[0].steps[1].sql: SQL syntax: Parser Error" in err
        assert "  warning: processors[0].steps[0].filter: field 'humidity'" in err


def test_estimator_and_metric_typos_suggest_the_river_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = {"name": "m", "input": "clean", "output": "scored", "target": "temperature",
             "estimator": [{"linear_model.LogisticRegresion": {}}], "metrics": ["Acuracy"]}
    assert main(["validate", write(tmp_path, pipeline(SCHEMA, models=[model]))]) == 2
    err = capsys.readouterr().err
    assert "models[0].estimator: river has no 'linear_model.LogisticRegresion' (did you mean " \
        "'linear_model.LogisticRegression'?)" in err
    assert "models[0].metrics[0]: river.metrics has no metric 'Acuracy' (did you mean 'Accuracy'?)" in err
    model.update(estimator="tests.estimators:pickyy", metrics=["MAE"])
    assert main(["validate", write(tmp_path, pipeline(SCHEMA, models=[model]))]) == 2
    assert "has no 'pickyy' (did you mean 'picky'?)" in capsys.readouterr().err


def test_a_type_error_is_an_error_where_the_types_are_known() -> None:
    """Within a stage a field keeps its declared type; through a topic's JSON a timestamp is
    only known by name, so DuckDB's doubts about its type are no finding."""
    typed = {"schema": {"id": {"type": "string"}, "ts": {"type": "timestamp"}}}
    found = only(check(pipeline(typed, {"sql": "SELECT *, date_trunc('hour', id) AS hour FROM batch"})))
    assert found.message.startswith("SQL: Binder Error: ") and "date_trunc" in found.message
    assert check(pipeline(typed, {"sql": "SELECT *, date_trunc('hour', ts) AS hour FROM batch"})) == []
    data = pipeline(typed)
    data["processors"].append({"name": "next", "input": "clean", "output": "hourly", "steps": [
        {"sql": "SELECT *, date_trunc('hour', ts) AS hour FROM batch"}]})
    assert check(data) == []


def test_sql_reaches_no_file_when_validated(tmp_path: Path) -> None:
    """validate runs each statement over no rows, and without access to files or URLs."""
    target = tmp_path / "copied.csv"
    copy = {"sql": f"COPY (SELECT * FROM batch) TO '{target}'"}
    read = {"filter": f"id IN (SELECT id FROM read_csv('{tmp_path / 'ids.csv'}'))"}
    assert check(pipeline(SCHEMA, copy)) == []
    assert check(pipeline(SCHEMA, read)) == []
    assert not target.exists()
