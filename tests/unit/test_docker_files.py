"""The container files, checked structurally (no Docker engine runs where the tests run)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client import generate_latest

from streamflow.config import load_pipeline
from streamflow.metrics import PipelineMetrics

DOCKER = Path(__file__).parents[2] / "docker"
STAGES = ("sensors", "clean", "predict", "lake")


def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def catalogue() -> set[str]:
    metrics = PipelineMetrics("p")
    metrics.stage("s", ("sql",)).lag("t", 0)
    metrics.source("s")
    metrics.sink("s")
    metrics.model("s", "m").metric("MAE", "rolling", 0)
    names = set()
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][\w:]*", line).group(0))
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads((DOCKER / "grafana" / "dashboards" / "streamflow.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_compose_has_the_whole_stack() -> None:
    services = compose()["services"]
    assert {"kafka", "postgres", "prometheus", "grafana", *STAGES} <= set(services)
    kafka = services["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"] and "KAFKA_ZOOKEEPER_CONNECT" not in kafka
    assert services["kafka"]["healthcheck"] and services["postgres"]["healthcheck"]


def test_every_stage_is_a_service_with_health_and_replicas() -> None:
    services = compose()["services"]
    pipeline = load_pipeline(DOCKER / "pipeline.yaml", environ={})
    names = {c.name for c in [*pipeline.sources, *pipeline.processors, *pipeline.models,
                              *pipeline.sinks]}
    assert names == set(STAGES)
    for stage in STAGES:
        service = services[stage]
        assert service["command"][-2:] == ["--stage", stage]
        assert "/healthz" in " ".join(service["healthcheck"]["test"])
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
        assert service["environment"]["STREAMFLOW_BOOTSTRAP"] == "kafka:9092"
        assert service["deploy"]["replicas"] >= 1
    assert services["clean"]["deploy"]["replicas"] > 1


def test_mounted_files_exist() -> None:
    for name, service in compose()["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"


def test_dockerfile_is_slim_non_root_with_healthcheck_and_exec_entrypoint() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert re.search(r"^USER 10001$", dockerfile, re.M)
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert re.search(r'^ENTRYPOINT \["streamflow"\]$', dockerfile, re.M)


def test_the_image_installs_the_extras_of_the_built_in_connectors() -> None:
    """The postgres source and sink, the mqtt source, the delta and iceberg sinks and the
    model_report job work in the image."""
    install = re.search(r"pip install [^']*'\.\[([a-z,]+)\]'", (DOCKER / "Dockerfile").read_text())
    assert install is not None
    assert {"postgres", "mqtt", "delta", "iceberg", "reports"} <= set(install.group(1).split(","))


def test_grafana_dashboard_is_provisioned_and_queries_known_metrics() -> None:
    provider = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "streamflow.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    known = catalogue()
    queries = dashboard_queries()
    assert len(queries) >= 10
    for query in queries:
        for name in re.findall(r"streamflow_[a-z_]+", query):
            assert name in known, f"dashboard queries unknown metric {name}"


def test_prometheus_scrapes_every_stage_service() -> None:
    config = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    discovery = config["scrape_configs"][0]["dns_sd_configs"][0]
    assert set(discovery["names"]) == set(STAGES) and discovery["port"] == 9108
