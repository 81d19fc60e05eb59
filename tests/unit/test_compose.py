"""Structure of docker-compose.yml and the Dockerfile (no Docker engine needed to check them)."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SAMESTYLE_SERVICES = ("topics", "worker-1", "worker-2")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with (ROOT / "docker-compose.yml").open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)  # safe_load resolves the "<<" merge keys compose uses


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):  # the "- KEY=value" form
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def test_expected_services(services: dict[str, Any]) -> None:
    assert {"kafka", *SAMESTYLE_SERVICES} <= set(services)


def test_kafka_is_single_node_kraft(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:3\.\d+\.\d+", kafka["image"])
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_NODE_ID"] == "1"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    listeners = env["KAFKA_LISTENERS"].split(",")
    assert "PLAINTEXT://:9092" in listeners
    assert "CONTROLLER://:9093" in listeners
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    protocol_map = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    assert {listener.split("://")[0] for listener in listeners} <= set(protocol_map)
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    # kafka-storage format accepts only a base64url UUID: 22 characters, 16 bytes.
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16


def test_kafka_healthcheck_and_data_volume(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    kafka = services["kafka"]
    test = kafka["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else test
    assert "/opt/kafka/bin/kafka-broker-api-versions.sh" in command
    assert "9092" in command
    log_dir = _env(kafka)["KAFKA_LOG_DIRS"]
    mounts = dict(volume.split(":", 1) for volume in kafka["volumes"])
    assert log_dir in mounts.values()
    assert all(name in compose["volumes"] for name in mounts)


def test_topics_job_waits_for_a_healthy_broker(services: dict[str, Any]) -> None:
    topics = services["topics"]
    assert topics["command"] == ["create-topics"]
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert topics.get("restart", "no") == "no"  # one-shot: must not loop after success


def test_workers_wait_for_topics_and_keep_their_own_state(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    host_ports = []
    for name in ("worker-1", "worker-2"):
        worker = services[name]
        assert worker["command"] == ["worker"]
        assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        env = _env(worker)
        assert env["SAMESTYLE_WORKER_ID"] == name
        assert env["SAMESTYLE_STATE_DIR"] == "/state"
        volume, target = worker["volumes"][0].split(":", 1)
        assert target == "/state"
        assert volume in compose["volumes"]  # a named volume, not a bind mount
        (mapping,) = worker["ports"]
        host, container = str(mapping).split(":")
        assert container == env.get("SAMESTYLE_WEB_PORT", "6066") == "6066"
        host_ports.append(host)
    assert host_ports == ["6066", "6067"]
    assert services["worker-1"]["volumes"] != services["worker-2"]["volumes"]


def test_every_service_names_the_bootstrap_server(services: dict[str, Any]) -> None:
    assert "PLAINTEXT://kafka:9092" in _env(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    for name in SAMESTYLE_SERVICES:
        assert _env(services[name])["SAMESTYLE_BOOTSTRAP"] == "kafka:9092", name
    for name, service in services.items():
        env = _env(service)
        assert any("kafka:9092" in value for value in env.values()), name


def test_samestyle_services_build_from_the_repo(services: dict[str, Any]) -> None:
    for name in SAMESTYLE_SERVICES:
        assert services[name]["build"] in (".", {"context": "."}), name


def test_monitoring_has_a_place() -> None:
    text = (ROOT / "docker-compose.yml").read_text(encoding="utf-8").lower()
    assert "prometheus" in text and "grafana" in text


def test_dockerfile_pins_cpu_torch() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    torch_line = next(
        line for line in dockerfile.splitlines() if "pip install" in line and "torch==" in line
    )
    assert "torch==2.13.0" in torch_line
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line
    assert re.search(r"pip install \"?\.\[cpu\]\"?", dockerfile)
    # torch must be installed before the project, or the project's install pulls CUDA wheels.
    assert dockerfile.index("torch==2.13.0") < dockerfile.index(".[cpu]")
    assert re.search(r'^ENTRYPOINT \["samestyle"\]', dockerfile, re.MULTILINE)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"torch==2.13.0"' in pyproject  # the image and the package agree


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv"} <= set(ignored)
