"""Structure of docker-compose.yml and the Dockerfile (no Docker engine needed to check them)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[3]
SAMESTYLE_SERVICES = ("topics", "worker-1", "worker-2", "trainer")
MONITORING_SERVICES = ("prometheus", "grafana")
#: The Milvus standalone of the "milvus" profile and what it stores in.
MILVUS_SERVICES = ("milvus", "milvus-etcd", "milvus-minio")
DEPLOY = ROOT / "deploy"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    with (ROOT / "docker-compose.yml").open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)  # safe_load resolves the "<<" merge keys compose uses


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _interpolated(value: str, shell: dict[str, str]) -> str:
    """``${VAR:-default}`` / ``${VAR}`` as compose fills them in from the shell's environment."""
    def one(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3) or ""
        return shell.get(name) or default
    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?-([^}]*))?\}", one, value)


def _env(service: dict[str, Any], shell: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment as its container sees it, with ``shell`` the variables set where
    ``docker compose`` runs (none by default)."""
    env = service.get("environment", {})
    if isinstance(env, list):  # the "- KEY=value" form
        env = dict(item.split("=", 1) for item in env)
    return {key: _interpolated(str(value), shell or {}) for key, value in env.items()}


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


def test_the_topics_job_creates_the_catalogue_compacted(services: dict[str, Any]) -> None:
    from samestyle.topics import LISTING_EMBEDDINGS, LISTINGS, topic_specs

    # The job runs create-topics, which creates every topic with the registry's configs: listings
    # compacted, so a model switch re-embeds every listing however old (a week's retention would
    # drop the ones older than that).
    assert services["topics"]["command"] == ["create-topics"]
    assert "SAMESTYLE_PARTITIONS" not in _env(services["topics"])  # the workers use the registry's counts
    specs = topic_specs()
    assert specs[LISTINGS].config()["cleanup.policy"] == "compact"
    assert specs[LISTING_EMBEDDINGS].config()["cleanup.policy"] == "compact"
    kafka = _env(services["kafka"])
    assert kafka.get("KAFKA_LOG_CLEANER_ENABLE", "true") == "true"  # compaction needs the log cleaner
    assert "KAFKA_LOG_CLEANUP_POLICY" not in kafka  # no broker-wide override of the topics' policy


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


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_workers_mine_pairs_and_the_trainer_shares_their_model_volume(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    """The deployed stack learns: every worker runs the click-pairs agents, the trainer retrains
    from their pairs and writes candidates where the workers load promoted models from."""
    from samestyle.streams.settings import Settings

    for name in ("worker-1", "worker-2"):
        assert Settings.from_env({"SAMESTYLE_" + k.removeprefix("SAMESTYLE_"): v
                                  for k, v in _env(services[name]).items()}).pairs_enabled, name
    trainer = services["trainer"]
    command = trainer["command"]
    assert command[0] == "trainer" and "--once" not in command  # a service: it keeps following the pairs
    assert trainer["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert trainer.get("restart") == "unless-stopped"
    mounts = _mounts(trainer)
    models_dir = _flag(command, "--models-dir")
    models_volume = mounts[models_dir]
    assert models_volume in compose["volumes"]  # a named volume the workers share
    assert not trainer["volumes"][[v.split(":")[1] for v in trainer["volumes"]].index(models_dir)].endswith(":ro")
    for name in ("worker-1", "worker-2"):
        # The same path in every container: a promoted record's model_dir is the trainer's path.
        assert _mounts(services[name]).get(models_dir) == models_volume, name
    work_dir = _flag(command, "--work-dir")
    assert mounts[work_dir] in compose["volumes"]  # the trainer's state survives a restart
    for flag in ("--listings", "--valid-clusters"):
        path = _flag(command, flag)
        assert any(path.startswith(target.rstrip("/") + "/") for target in mounts), (flag, path)
    assert Settings.from_env(_env(trainer)).trainer_max_pairs == int(_env(trainer)["SAMESTYLE_TRAINER_MAX_PAIRS"])
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    for path in (models_dir, work_dir):  # created in the image, owned by its user: volumes inherit that
        assert re.search(rf"mkdir -p [^\n]*{path}\b", dockerfile) and re.search(rf"chown samestyle [^\n]*{path}\b",
                                                                                    dockerfile), path


def test_every_service_names_the_bootstrap_server(services: dict[str, Any]) -> None:
    assert "PLAINTEXT://kafka:9092" in _env(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"]
    for name in SAMESTYLE_SERVICES:
        assert _env(services[name])["SAMESTYLE_BOOTSTRAP"] == "kafka:9092", name
    for name, service in services.items():
        if name in MONITORING_SERVICES or name in MILVUS_SERVICES:  # they never talk to Kafka
            continue
        env = _env(service)
        assert any("kafka:9092" in value for value in env.values()), name


def test_samestyle_services_build_from_the_repo(services: dict[str, Any]) -> None:
    for name in SAMESTYLE_SERVICES:
        build = services[name]["build"]
        assert build == "." or build["context"] == ".", name
        # One image serves both index backends: the Dockerfile's EXTRAS add the Milvus client.
        extras = {e.strip() for e in build.get("args", {}).get("EXTRAS", "cpu").split(",")}
        assert {"cpu", "milvus"} <= extras, name


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (or volume name) of a service's volumes."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def test_prometheus_scrapes_both_workers(compose: dict[str, Any], services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    mounts = _mounts(prometheus)
    config_path = mounts["/etc/prometheus/prometheus.yml"]
    assert (ROOT / config_path).resolve() == DEPLOY / "prometheus.yml"
    assert mounts["/prometheus"] in compose["volumes"]
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "samestyle"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    web_ports = {name: _env(services[name]).get("SAMESTYLE_WEB_PORT", "6066") for name in ("worker-1", "worker-2")}
    assert targets == {f"{name}:{port}" for name, port in web_ports.items()}


def test_grafana_is_provisioned(compose: dict[str, Any], services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    mounts = _mounts(grafana)
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    assert mounts["/var/lib/grafana"] in compose["volumes"]
    (datasource,) = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yml").read_text(encoding="utf-8"))["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (provisioning / "dashboards" / "samestyle.yml").read_text(encoding="utf-8"))["providers"]
    dashboards_in_container = provider["options"]["path"]
    assert (ROOT / mounts[dashboards_in_container] / "samestyle.json").is_file()
    assert {"prometheus"} <= set(grafana["depends_on"])


def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "samestyle.json").read_text(encoding="utf-8"))


def _queries() -> list[str]:
    return [t["expr"] for panel in _dashboard()["panels"] for t in panel.get("targets", [])]


#: PromQL words that look like metric names but are functions, keywords or label names.
_PROMQL_WORDS = {"sum", "max", "min", "avg", "rate", "increase", "irate", "histogram_quantile", "by", "without",
                 "le", "on", "ignoring", "offset", "count", "topk", "bool", "and", "or", "unless"}


def _metric_names_in(expr: str) -> set[str]:
    expr = re.sub(r'"[^"]*"', "", expr)        # label values
    expr = re.sub(r"\{[^}]*\}", "", expr)      # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)      # range selectors
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping label lists
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w not in _PROMQL_WORDS}


def test_dashboard_queries_name_only_exported_metrics() -> None:
    from samestyle.streams.worker.metrics import Metrics, metric_names

    exported = metric_names(Metrics())
    named: set[str] = set()
    for expr in _queries():
        named |= _metric_names_in(expr)
    assert named, "the dashboard has no queries"
    assert named <= exported, f"not exported by streams.metrics: {sorted(named - exported)}"


def test_dashboard_covers_what_operators_watch() -> None:
    queries = " ".join(_queries())
    for metric in ("samestyle_consumer_lag_messages", "samestyle_messages_processed_total",
                   "samestyle_listing_to_searchable_seconds_bucket", "samestyle_listing_to_emitted_seconds_bucket",
                   "samestyle_duplicate_alerts_emitted_total", "samestyle_dead_letters_total",
                   # the learning loop: pairs mined, held by each constraint, table sizes, trainer decisions
                   "samestyle_pairs_emitted_total", "samestyle_pairs_held", "samestyle_pairs_table_keys",
                   "samestyle_trainer_decisions_total"):
        assert metric in queries, metric
    assert "partition" in queries  # lag per partition, not only in total
    assert "histogram_quantile" in queries
    datasource_uids = {p["datasource"]["uid"] for p in _dashboard()["panels"]}
    provisioned = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
                                 .read_text(encoding="utf-8"))["datasources"][0]["uid"]
    assert datasource_uids == {provisioned}


def test_dockerfile_pins_cpu_torch() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.MULTILINE)
    torch_line = next(
        line for line in dockerfile.splitlines() if "pip install" in line and "torch==" in line
    )
    assert "torch==2.13.0" in torch_line
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_line
    # The extras default to cpu (faiss-cpu); compose adds milvus through the EXTRAS build argument.
    assert re.search(r"^ARG EXTRAS=cpu$", dockerfile, re.MULTILINE)
    assert re.search(r'pip install "\.\[\$\{EXTRAS\}\]"', dockerfile)
    # torch must be installed before the project, or the project's install pulls CUDA wheels.
    assert dockerfile.index("torch==2.13.0") < dockerfile.index(".[${EXTRAS}]")
    assert re.search(r'^ENTRYPOINT \["samestyle"\]', dockerfile, re.MULTILINE)
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert '"torch==2.13.0"' in pyproject  # the image and the package agree


def _service_env(services: dict[str, Any], name: str, shell: dict[str, str] | None = None) -> Any:
    from samestyle.streams.settings import Settings

    return Settings.from_env({k: v for k, v in _env(services[name], shell).items() if k.startswith("SAMESTYLE_")})


def test_the_milvus_profile_runs_milvus_standalone_with_its_etcd_and_object_store(
        compose: dict[str, Any], services: dict[str, Any]) -> None:
    for name in MILVUS_SERVICES:
        assert services[name].get("profiles") == ["milvus"], name  # only with --profile milvus
        assert "healthcheck" in services[name], name
        for source in _mounts(services[name]).values():
            assert source in compose["volumes"], (name, source)  # named volumes: data outlives a container
    for name in (*SAMESTYLE_SERVICES, "kafka", *MONITORING_SERVICES):
        assert "profiles" not in services[name], name  # the default stack is unchanged
    milvus = services["milvus"]
    assert re.fullmatch(r"milvusdb/milvus:v2\.\d+\.\d+", milvus["image"])
    assert milvus["command"] == ["milvus", "run", "standalone"]
    env = _env(milvus)
    etcd_host, etcd_port = env["ETCD_ENDPOINTS"].split(":")
    minio_host, minio_port = env["MINIO_ADDRESS"].split(":")
    assert (etcd_host, etcd_port, minio_host, minio_port) == ("milvus-etcd", "2379", "milvus-minio", "9000")
    for dependency in (etcd_host, minio_host):
        assert milvus["depends_on"][dependency]["condition"] == "service_healthy"
    assert re.fullmatch(r"quay\.io/coreos/etcd:v3\.\d+\.\d+", services["milvus-etcd"]["image"])
    etcd = " ".join(services["milvus-etcd"]["command"])
    assert "-listen-client-urls=http://0.0.0.0:2379" in etcd and "--data-dir=/etcd" in etcd
    assert "/etcd" in _mounts(services["milvus-etcd"])
    assert services["milvus-minio"]["image"].startswith("minio/minio:RELEASE.")
    minio = services["milvus-minio"]["command"]
    assert minio[:2] == ["minio", "server"] and minio[2] in _mounts(services["milvus-minio"])
    assert "localhost:9091/healthz" in " ".join(milvus["healthcheck"]["test"])
    assert "19530:19530" in [str(p).split()[0] for p in milvus["ports"]]
    assert "/var/lib/milvus" in _mounts(milvus)


def test_workers_keep_faiss_by_default_and_point_at_the_milvus_service_with_the_profile(
        services: dict[str, Any]) -> None:
    from urllib.parse import urlparse

    published = {str(p).split(":")[-1].split()[0] for p in services["milvus"]["ports"]}
    for name in ("worker-1", "worker-2"):
        worker = services[name]
        default = _service_env(services, name)
        assert default.index_backend == "faiss"  # `docker compose up` is what it was
        on_milvus = _service_env(services, name, {"SAMESTYLE_INDEX_BACKEND": "milvus"})
        assert on_milvus.index_backend == "milvus"
        uri = urlparse(on_milvus.effective_milvus_uri)
        assert uri.scheme == "http" and uri.hostname == "milvus" and str(uri.port) in published, name
        # Started after a healthy Milvus when the profile runs it; without the profile, not waited for.
        assert worker["depends_on"]["milvus"] == {"condition": "service_healthy", "required": False}
        assert worker["depends_on"]["topics"]["condition"] == "service_completed_successfully"


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv"} <= set(ignored)
