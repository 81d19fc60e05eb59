"""One typed, frozen Settings object for every process, read from the environment at the entry point.

Every field has an environment variable ``SAMESTYLE_<FIELD>`` (upper case). Nothing else in the
code reads the environment: the settings are passed down explicitly, so tests can build an app
with any settings they like.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from topics.errors import ConfigError

ENV_PREFIX = "SAMESTYLE_"


@dataclass(frozen=True)
class Settings:
    """Everything a worker, the demo or the producer needs to know."""

    #: ``host:port[,host:port]`` of a Kafka cluster; None means "start the embedded broker"
    #: (only the CLI's demo does that; a worker needs a broker to join).
    bootstrap: str | None = None
    #: Prepended to every topic name (tests use a unique prefix per test).
    topic_prefix: str = ""
    #: Overrides the partition count of listings / listing-embeddings / similar-products at
    #: topic creation (more partitions = more embedding workers).
    partitions: int | None = None
    #: Faust application id = consumer group of the embed and index agents.
    app_id: str = "samestyle"
    #: Names this worker in logs, metrics and its state directory.
    worker_id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    #: Encoder spec: "default" (bundled pretrained backbones), "tiny" (tests only), a JSON
    #: config file or a trained model directory.
    encoder: str = "default"
    #: Let the "tiny" random-weight encoder run (tests only).
    allow_random_weights: bool = False
    #: "cpu", "cuda" or None for "cuda when present, else cpu".
    device: str | None = None
    #: Listings embedded per forward pass.
    batch_size: int = 32
    #: How long the embed agent waits to fill a batch before it embeds what it has.
    batch_linger_seconds: float = 0.05
    #: Neighbours per similar-products message.
    top_k: int = 10
    #: Image+text cosine at or above which a same-supplier neighbour is a duplicate. 0.82 is the
    #: middle of the gap between planted copies and other same-supplier pairs under the default
    #: encoder on the seed-1 sample (0.806 .. 0.845); the demo runs on seed 0. A trained model
    #: should be given the threshold chosen on its validation pairs.
    duplicate_threshold: float = 0.82
    #: "flat" (exact inner product) or "hnsw" (approximate, for large catalogues).
    index_kind: str = "flat"
    #: Where the index snapshots (and Faust's own data) live.
    state_dir: Path = Path("state")
    #: Seconds between index snapshots (0 disables periodic snapshots; one is still taken at stop).
    snapshot_interval_seconds: float = 30.0
    #: Longest title + description + attributes text accepted, in characters.
    max_text_chars: int = 100_000
    #: Largest image accepted, in bytes.
    max_image_bytes: int = 20_000_000
    #: Base directory for relative ``image_uri`` values.
    image_base_dir: Path | None = None
    #: Consumer group session timeout and heartbeat (BROKER.md: group joins take ~half of it).
    session_timeout_seconds: float = 6.0
    heartbeat_interval_seconds: float = 2.0
    #: The worker's HTTP port (health now, metrics and search later); 0 disables it.
    web_port: int = 6066
    #: Largest message a producer may send (a dead letter carries the original bytes).
    max_message_bytes: int = 8_388_608
    log_level: str = "info"

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append("batch_size must be >= 1")
        if self.top_k < 1:
            problems.append("top_k must be >= 1")
        if not -1.0 <= self.duplicate_threshold <= 1.0:
            problems.append("duplicate_threshold is a cosine and must lie in [-1, 1]")
        if self.index_kind not in ("flat", "hnsw"):
            problems.append(f"index_kind must be 'flat' or 'hnsw', not {self.index_kind!r}")
        if self.partitions is not None and self.partitions < 1:
            problems.append("partitions must be >= 1")
        if self.batch_linger_seconds <= 0:
            problems.append("batch_linger_seconds must be > 0")
        if self.heartbeat_interval_seconds >= self.session_timeout_seconds:
            problems.append("heartbeat_interval_seconds must be below session_timeout_seconds")
        if problems:
            raise ConfigError("invalid settings: " + "; ".join(problems))

    @property
    def broker_url(self) -> str:
        """The Faust broker URL (``kafka://host:port;host:port``)."""
        if not self.bootstrap:
            raise ConfigError("no bootstrap server configured (set SAMESTYLE_BOOTSTRAP)")
        return ";".join(f"kafka://{h.strip()}" for h in self.bootstrap.split(",") if h.strip())

    @property
    def bootstrap_servers(self) -> list[str]:
        if not self.bootstrap:
            raise ConfigError("no bootstrap server configured (set SAMESTYLE_BOOTSTRAP)")
        return [h.strip() for h in self.bootstrap.split(",") if h.strip()]

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment that makes :meth:`from_env` rebuild these settings (for child processes)."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, bool):
                value = "1" if value else "0"
            env[ENV_PREFIX + f.name.upper()] = str(value)
        return env

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Read ``SAMESTYLE_*`` variables; ``overrides`` (e.g. from CLI flags) win over them."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(name: str, type_name: Any, raw: str) -> Any:
    type_text = str(type_name)
    try:
        if type_text.startswith("bool"):
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"expected a boolean, got {raw!r}")
        if type_text.startswith("int"):
            return int(raw)
        if type_text.startswith("float"):
            return float(raw)
        if "Path" in type_text:
            return Path(raw)
        return raw
    except ValueError as exc:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {exc}") from None
