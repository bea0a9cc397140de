"""The command line: the standalone broker, a missing broker binary, and one stage at a time."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamflow.cli import main
from streamflow.transport import TopicSpec, create_transport
from streamflow.transport.broker import free_port
from tests.helpers import read_topic, run_on_terminal

QUICKSTART = Path(__file__).parents[2] / "examples" / "quickstart.yaml"


def test_broker_command_serves_kafka_until_sigterm() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "streamflow", "broker", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        assert process.stdout is not None
        assert f"127.0.0.1:{port}" in process.stdout.readline().decode()
        admin = create_transport("confluent", f"127.0.0.1:{port}").admin()
        admin.create_topics([TopicSpec("hello", 2)])
        assert admin.describe_topics(["hello"]) == {"hello": 2}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0


def test_missing_broker_binary_says_to_use_a_real_kafka(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("STREAMFLOW_TANSU_BINARY", "/nonexistent/tansu")
    monkeypatch.delenv("STREAMFLOW_BOOTSTRAP", raising=False)
    assert main(["run", str(QUICKSTART), "--metrics-port", "0"]) == 1
    assert "set kafka.bootstrap to a real Kafka" in capsys.readouterr().err


def test_stages_run_one_at_a_time(fresh_broker: str, tmp_path: Path) -> None:
    env = {**os.environ, "STREAMFLOW_BOOTSTRAP": fresh_broker, "QUICKSTART_COUNT": "800",
           "QUICKSTART_RATE": "0", "QUICKSTART_OUTPUT": str(tmp_path),
           "QUICKSTART_CHECKPOINTS": str(tmp_path / "checkpoints")}

    def run_stage(name: str) -> None:
        completed = subprocess.run(
            [sys.executable, "-m", "streamflow", "run", str(QUICKSTART), "--stage", name,
             "--until-idle", "1", "--metrics-port", "0"],
            env=env, capture_output=True, timeout=120,
        )
        assert completed.returncode == 0, completed.stdout.decode()[-2000:]

    run_stage("sensors")
    assert len(read_topic(fresh_broker, "sensors.raw")) == 800
    assert len(read_topic(fresh_broker, "sensors.clean")) == 0
    run_stage("clean")
    cleaned = len(read_topic(fresh_broker, "sensors.clean"))
    assert cleaned + len(read_topic(fresh_broker, "quickstart.dlq")) == 800
    assert not list(tmp_path.rglob("*.parquet")), "the sink stage did not run"


def test_a_fatal_failure_exits_non_zero_with_one_clear_message(
    fresh_broker: str, tmp_path: Path
) -> None:
    pipeline = QUICKSTART.read_text().replace(
        "      - schema:\n", "      - on_error: fail\n        schema:\n"
    )
    assert "on_error: fail" in pipeline
    path = tmp_path / "strict.yaml"
    path.write_text(pipeline)
    env = {**os.environ, "STREAMFLOW_BOOTSTRAP": fresh_broker, "QUICKSTART_COUNT": "2000",
           "QUICKSTART_RATE": "0", "QUICKSTART_OUTPUT": str(tmp_path / "lake"),
           "QUICKSTART_CHECKPOINTS": str(tmp_path / "checkpoints")}
    completed = subprocess.run(
        [sys.executable, "-m", "streamflow", "run", str(path), "--metrics-port", "0"],
        env=env, capture_output=True, timeout=120,
    )
    assert completed.returncode == 1
    errors = [line for line in completed.stderr.decode().splitlines() if " ERROR streamflow: " in line]
    assert len(errors) == 1, completed.stderr.decode()[-3000:]
    assert "clean failed: StepFailedError: step 'schema' failed" in errors[0]
    assert "on_error: fail" in errors[0]


def run_bounded(*extra: str) -> list[str]:
    return [sys.executable, "-m", "streamflow", *extra, "run", str(QUICKSTART), "--until-idle",
            "1", "--metrics-port", "0", "--progress-interval", "0.5"]


def bounded_env(bootstrap: str, tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "STREAMFLOW_BOOTSTRAP": bootstrap, "QUICKSTART_COUNT": "3000",
            "QUICKSTART_RATE": "1500", "QUICKSTART_OUTPUT": str(tmp_path / "lake"),
            "QUICKSTART_CHECKPOINTS": str(tmp_path / "checkpoints")}


def test_a_bounded_run_logs_progress_and_json_on_request(fresh_broker: str, tmp_path: Path) -> None:
    completed = subprocess.run(
        run_bounded("--log-format", "json"),
        env=bounded_env(fresh_broker, tmp_path), capture_output=True, timeout=120,
    )
    assert completed.returncode == 0, completed.stderr.decode()[-2000:]
    lines = [json.loads(line) for line in completed.stderr.decode().splitlines()]  # JSON only
    assert completed.stdout == b""
    progress = [line["message"] for line in lines if line["logger"] == "streamflow.progress"]
    assert [line["logger"] for line in lines][-1] == "streamflow.summary"
    assert progress and all(p.startswith("progress: ") and " lag " in p for p in progress)
    assert any("sensors 1," in p or "sensors 2," in p or "/s" in p for p in progress)


def test_a_bounded_run_on_a_terminal_shows_a_live_line(fresh_broker: str, tmp_path: Path) -> None:
    code, output = run_on_terminal(run_bounded(), bounded_env(fresh_broker, tmp_path))
    assert code == 0
    assert b"per s" in output and b"lag" in output  # the live table's header
    assert b"streamflow.progress" not in output, "a terminal gets the live table, not log lines"


def test_secrets_in_the_config_never_appear_in_the_logs(fresh_broker: str, tmp_path: Path) -> None:
    secret = "hunter2-do-not-log"
    pipeline = QUICKSTART.read_text().replace(
        "  bootstrap: ${STREAMFLOW_BOOTSTRAP:-embedded}\n",
        "  bootstrap: ${STREAMFLOW_BOOTSTRAP:-embedded}\n"
        "  config:\n"
        "    security.protocol: SASL_PLAINTEXT\n"
        "    sasl.mechanism: PLAIN\n"
        "    sasl.username: streamflow\n"
        f"    sasl.password: {secret}\n",
    )
    path = tmp_path / "secret.yaml"
    path.write_text(pipeline)
    for log_format in ("text", "json"):
        # The broker does not speak SASL, so the daemon keeps waiting for it, logging why.
        log_path = tmp_path / f"daemon-{log_format}.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "streamflow", "--log-level", "DEBUG", "--log-format",
                 log_format, "run", str(path), "--metrics-port", "0"],
                env=bounded_env(fresh_broker, tmp_path), stdout=log_file,
                stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + 60
            while b"waiting for Kafka" not in log_path.read_bytes():
                assert time.monotonic() < deadline and process.poll() is None, log_path.read_text()
                time.sleep(0.2)
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
        assert secret not in log_path.read_text()
