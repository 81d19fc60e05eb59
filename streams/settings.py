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

from samestyle.topics.errors import ConfigError

ENV_PREFIX = "SAMESTYLE_"
#: Image+text cosine at or above which a same-supplier neighbour is a duplicate, for a model
#: without a duplicate classifier when ``SAMESTYLE_DUPLICATE_THRESHOLD`` is not set.
DEFAULT_COSINE_THRESHOLD = 0.82


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
    #: The duplicate decision's threshold. None (default): the served model's own threshold, i.e.
    #: its calibrated classifier's probability threshold (chosen on its validation pairs) when the
    #: model has a duplicate scorer; for a model without a classifier, 0.82 image+text cosine
    #: (:data:`DEFAULT_COSINE_THRESHOLD`). Set explicitly, it overrides the model's threshold and is
    #: read in the model's terms: a *probability* in [0, 1] when the served model has a scorer, an
    #: image+text *cosine* in [-1, 1] otherwise. (0.82 is the middle of the gap between planted
    #: copies and other same-supplier pairs under the default encoder on the seed-1 sample,
    #: 0.806 .. 0.845; the demo runs on seed 0.)
    duplicate_threshold: float | None = None
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
    #: Longest a group consumer's fetch waits for more data (Faust's own value is 1.5 s, which
    #: adds up to 1.5 s of latency per hop at low rates; see streams/transport.py).
    consumer_fetch_max_wait_seconds: float = 0.1
    #: torch intra-op threads for the encoder; unset = torch's default (all cores). On a shared
    #: 2-core machine 1 thread was steadier and faster (bench/results/pipeline_torch_threads1.json).
    torch_threads: int | None = None
    #: The worker's HTTP port (health now, metrics and search later); 0 disables it.
    web_port: int = 6066
    #: Largest message a producer may send (a dead letter carries the original bytes).
    max_message_bytes: int = 8_388_608
    log_level: str = "info"
    # --- pairs agent (streams/clicks.py, docs/PAIRS.md) ---
    #: A session's clicks belong to one session window until it is idle this long; each window
    #: counts once in a pair's ``sessions`` evidence.
    pairs_session_gap_seconds: float = 1800.0
    #: How many leading category path components ("Electronics > Audio > Headphones") both
    #: listings must share; 0 switches the category constraint off.
    pairs_category_level: int = 1
    #: What a pair whose category is unknown on either side gets (data without categories, or a
    #: listing not indexed yet): "skip" the category constraint, or "reject" the pair for now.
    pairs_unknown_category: str = "skip"
    #: Clicks (either direction, each click once) a pair needs before it can be positive.
    pairs_min_co_clicks: int = 5
    #: Distinct session windows a pair needs: one user clicking back and forth is not enough.
    pairs_min_sessions: int = 2
    #: A click with less dwell than this is a bounce and no evidence at all.
    pairs_min_dwell_ms: int = 30_000
    #: Image+text cosine under the current model a pair needs when both listings are indexed.
    pairs_min_cosine: float = 0.3
    #: True: a pair waits until both listings are indexed so the cosine can be checked; False
    #: (default): the cosine constraint is skipped for a pair with a listing not indexed yet.
    pairs_require_cosine: bool = False
    #: Send every changelog record in its own batch (producer_max_batch_size=1): tansu reports a
    #: wrong end offset otherwise and Faust table recovery silently stops short (BROKER.md trap
    #: 1). App-wide in Faust; turn off on real Apache Kafka.
    changelog_single_record_batches: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.batch_size < 1:
            problems.append("batch_size must be >= 1")
        if self.top_k < 1:
            problems.append("top_k must be >= 1")
        if self.duplicate_threshold is not None and not -1.0 <= self.duplicate_threshold <= 1.0:
            problems.append("duplicate_threshold (a probability for a model with a duplicate classifier, "
                            "else a cosine) must lie in [-1, 1]")
        if self.index_kind not in ("flat", "hnsw"):
            problems.append(f"index_kind must be 'flat' or 'hnsw', not {self.index_kind!r}")
        if self.partitions is not None and self.partitions < 1:
            problems.append("partitions must be >= 1")
        if self.batch_linger_seconds <= 0:
            problems.append("batch_linger_seconds must be > 0")
        if self.heartbeat_interval_seconds >= self.session_timeout_seconds:
            problems.append("heartbeat_interval_seconds must be below session_timeout_seconds")
        if self.pairs_session_gap_seconds <= 0:
            problems.append("pairs_session_gap_seconds must be > 0")
        if self.pairs_category_level < 0:
            problems.append("pairs_category_level must be >= 0")
        if self.pairs_unknown_category not in ("skip", "reject"):
            problems.append(f"pairs_unknown_category must be 'skip' or 'reject', not {self.pairs_unknown_category!r}")
        if self.pairs_min_co_clicks < 1 or self.pairs_min_sessions < 1:
            problems.append("pairs_min_co_clicks and pairs_min_sessions must be >= 1")
        if self.pairs_min_dwell_ms < 0:
            problems.append("pairs_min_dwell_ms must be >= 0")
        if not -1.0 <= self.pairs_min_cosine <= 1.0:
            problems.append("pairs_min_cosine is a cosine and must lie in [-1, 1]")
        if not 0 <= self.consumer_fetch_max_wait_seconds <= 10:
            problems.append("consumer_fetch_max_wait_seconds must lie in [0, 10]")
        if self.torch_threads is not None and self.torch_threads < 1:
            problems.append("torch_threads must be >= 1")
        if problems:
            raise ConfigError("invalid settings: " + "; ".join(problems))

    @property
    def effective_cosine_threshold(self) -> float:
        """The image+text cosine threshold of the cosine rule: ``duplicate_threshold`` when set,
        else :data:`DEFAULT_COSINE_THRESHOLD` (for readers that decide by cosine alone, such as
        the search API's duplicates view)."""
        return DEFAULT_COSINE_THRESHOLD if self.duplicate_threshold is None else self.duplicate_threshold

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
