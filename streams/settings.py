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

from samestyle.models.runtime import RUNTIME_NAMES
from samestyle.topics.errors import ConfigError

ENV_PREFIX = "SAMESTYLE_"
#: Image+text cosine at or above which a same-supplier neighbour is a duplicate, for a model
#: without a duplicate classifier when ``SAMESTYLE_DUPLICATE_THRESHOLD`` is not set.
DEFAULT_COSINE_THRESHOLD = 0.82
#: Shortest API token accepted: a guessable token is no authentication.
MIN_API_TOKEN_CHARS = 16


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
    #: A schema folder laid over the packaged ``topics/schemas`` file by file (same layout:
    #: ``<name>.avsc``, ``history/<name>/v<N>.avsc``): a newer version a producer writes, so that
    #: this release reads it, before an upgrade ships it (README, "Schema upgrades").
    schema_dir: Path | None = None
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
    #: "flat" (exact inner product) or "hnsw" (approximate, for large catalogues); the FAISS replica's kind.
    index_kind: str = "flat"
    #: The form the FAISS replica stores vectors in: "float32" (default), "float16" or "sq8"
    #: (faiss's 8-bit scalar quantiser); the compact forms also store no vector for a view a
    #: listing lacks (no image) nor a second copy of the searched one. Flat index only; recall
    #: against float32 and memory per listing: docs/SCALING.md.
    index_vectors: str = "float32"
    #: Where the index lives (docs/SCALING.md). "faiss" (default): every worker holds a full
    #: replica in memory, built from ``listing-embeddings``. "milvus": workers hold no replica; the
    #: index agent upserts each listing into Milvus (one collection per model version) and
    #: searches it there, and the search API queries it.
    index_backend: str = "faiss"
    #: The Milvus of ``index_backend="milvus"``: a local path ending in ``.db`` runs Milvus Lite
    #: inside the worker (one process per file: the demo, one worker); ``http(s)://host:port`` a
    #: Milvus standalone or cluster, or a ``milvus-lite server`` that several workers share. Unset:
    #: ``{state_dir}/milvus.db``. The FAISS backend ignores it.
    milvus_uri: str | None = None
    #: Token of a Milvus with authentication ("user:password" or an API key). Never printed.
    milvus_token: str | None = field(default=None, repr=False)
    #: Prepended to the Milvus collection and alias names: deployments (or tests) sharing one
    #: Milvus keep apart. Letters, digits and ``_``, starting with a letter.
    milvus_prefix: str = "samestyle"
    #: How long the worker retries a Milvus that cannot be reached before it gives up (and exits,
    #: to be restarted; nothing is committed meanwhile, so nothing is lost).
    milvus_retry_seconds: float = 120.0
    #: Where the index snapshots (and Faust's own data) live.
    state_dir: Path = Path("state")
    #: Seconds between index snapshots (0 disables periodic snapshots; one is still taken at stop).
    snapshot_interval_seconds: float = 30.0
    #: Longest a model switch waits, once this worker's re-embedding is done, for the new index to
    #: hold every listing of the serving one; then it switches without the listings still missing
    #: (counted and logged). Listings the listings log cannot supply never hold it up to this.
    switch_deadline_seconds: float = 1800.0
    #: Longest title + description + attributes text accepted, in characters.
    max_text_chars: int = 100_000
    #: Largest image accepted, in bytes.
    max_image_bytes: int = 20_000_000
    #: The only directory local ``image_uri`` values are read from: relative ones are taken from
    #: it, absolute ones (and ``file://`` URIs) must resolve inside it, symlinks and ``..``
    #: included. Unset: listings cannot name local images (inline bytes and URLs still work).
    image_base_dir: Path | None = None
    #: Comma-separated hosts (names or IP addresses) whose ``http(s)://`` images may be fetched
    #: although they resolve to a loopback, private, link-local or otherwise non-public address
    #: (an image server on the internal network). Cloud metadata addresses are refused anyway.
    #: Parsed by the image fetcher (``streams/io/addresses.py``) when the worker starts.
    image_allowed_hosts: str = ""
    #: Image fetches in flight at once per worker (the embed agent, a model switch's
    #: re-embedding and thumbnails share them).
    image_fetch_concurrency: int = 16
    #: Longest wait for a TCP (and TLS) connection to an image host, and between two reads of
    #: its answer.
    image_fetch_connect_timeout_seconds: float = 3.0
    image_fetch_read_timeout_seconds: float = 5.0
    #: Longest one attempt at an image may take, redirects and body included (a server that
    #: drips bytes just under the read timeout is stopped here).
    image_fetch_timeout_seconds: float = 10.0
    #: Further attempts after a 5xx answer, a timeout or a dropped connection (never after a 4xx
    #: or a refused address).
    image_fetch_retries: int = 2
    #: Redirects followed per fetch; each new location is checked like the first.
    image_fetch_max_redirects: int = 3
    #: Consumer group session timeout and heartbeat (BROKER.md: group joins take ~half of it).
    session_timeout_seconds: float = 6.0
    heartbeat_interval_seconds: float = 2.0
    #: Longest a group consumer's fetch waits for more data (Faust's own value is 1.5 s, which
    #: adds up to 1.5 s of latency per hop at low rates; see streams/transport.py).
    consumer_fetch_max_wait_seconds: float = 0.1
    #: torch intra-op threads for the encoder; unset = torch's default (all cores). On a shared
    #: 2-core machine 1 thread was steadier and faster (bench/results/pipeline_torch_threads1.json).
    torch_threads: int | None = None
    #: How the encoder's backbones compute (models/runtime.py): "auto" (the device's measured
    #: default: bf16 on a CPU with native bf16, eager elsewhere), "eager" (float32 as trained),
    #: "bf16", "int8", "channels-last" or "compile". Speed and recall of each:
    #: bench/results/encoder.json (``samestyle bench encoder``).
    encoder_runtime: str = "auto"
    #: Overlap the embed agent's batches: prepare the next batch while one is embedded, and embed
    #: while the one before awaits the broker (streams/worker/embedding.py). Off by default: it
    #: measured no faster on a GIL-bound 2-core worker, and a broker restart during a model switch
    #: then made the embedded broker fail writes (see the module docstring).
    embed_overlap: bool = False
    #: The worker's HTTP port (health now, metrics and search later); 0 disables it.
    web_port: int = 6066
    #: Bearer token of the search API and page (``/metrics`` and ``/health`` stay open). Unset,
    #: with no ``api_token_file``: the API is open. Never printed (``repr=False``).
    api_token: str | None = field(default=None, repr=False)
    #: A file holding the token (first line; a mounted secret), instead of ``api_token``.
    api_token_file: Path | None = None
    #: Newest duplicate alerts (and moderation decisions) each worker keeps in memory for the
    #: moderation page; older ones drop out of its feed.
    moderation_alerts_buffer: int = 1000
    #: Largest message a producer may send (a dead letter carries the original bytes).
    max_message_bytes: int = 8_388_608
    log_level: str = "info"
    # --- pairs agents (streams/pairs/, docs/PAIRS.md) ---
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
    #: Run the click-pairs agents in this worker (``samestyle worker``); off for embed-only workers.
    pairs_enabled: bool = True
    #: Pair evidence (and a session's windows) expires after this much idle *event* time: the
    #: tables hold recent pairs only. 0 keeps them forever.
    pairs_evidence_ttl_seconds: float = 30 * 24 * 3600.0
    #: Most click records the pairs agents fold per batch (one table write per key per batch).
    pairs_batch_max_records: int = 10_000
    #: Longest the pairs agents go between offset commits while busy (they commit at once when idle).
    pairs_commit_interval_seconds: float = 1.0
    #: The trainer's window: the newest mined pairs it keeps (and trains on); older ones are dropped.
    trainer_max_pairs: int = 100_000
    #: The trainer's window of moderation decisions: the latest decision of the N pairs decided
    #: most recently (docs/RETRAIN.md).
    trainer_max_labels: int = 100_000
    #: Weight of a moderator's decision (confirmed: a positive, rejected: a hard negative) in a
    #: candidate's training against 1 for a click-mined pair (docs/RETRAIN.md, "Moderators' decisions").
    trainer_label_weight: float = 3.0

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
        if self.index_vectors not in ("float32", "float16", "sq8"):
            problems.append(f"index_vectors must be 'float32', 'float16' or 'sq8', not {self.index_vectors!r}")
        elif self.index_vectors != "float32" and self.index_kind != "flat":
            problems.append("index_vectors 'float16' and 'sq8' need index_kind 'flat'")
        problems += self._index_backend_problems()
        if self.partitions is not None and self.partitions < 1:
            problems.append("partitions must be >= 1")
        if self.batch_linger_seconds <= 0:
            problems.append("batch_linger_seconds must be > 0")
        if self.switch_deadline_seconds <= 0:
            problems.append("switch_deadline_seconds must be > 0")
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
        if self.pairs_evidence_ttl_seconds < 0:
            problems.append("pairs_evidence_ttl_seconds must be >= 0 (0: never expire)")
        elif 0 < self.pairs_evidence_ttl_seconds < self.pairs_session_gap_seconds:
            problems.append("pairs_evidence_ttl_seconds must be at least pairs_session_gap_seconds")
        if self.pairs_batch_max_records < 1 or self.pairs_commit_interval_seconds <= 0:
            problems.append("pairs_batch_max_records must be >= 1 and pairs_commit_interval_seconds > 0")
        if self.trainer_max_pairs < 2:
            problems.append("trainer_max_pairs must be >= 2")
        if self.trainer_max_labels < 1:
            problems.append("trainer_max_labels must be >= 1")
        if not (self.trainer_label_weight > 0 and self.trainer_label_weight != float("inf")):
            problems.append("trainer_label_weight must be finite and > 0")
        if not 0 <= self.consumer_fetch_max_wait_seconds <= 10:
            problems.append("consumer_fetch_max_wait_seconds must lie in [0, 10]")
        if self.torch_threads is not None and self.torch_threads < 1:
            problems.append("torch_threads must be >= 1")
        if self.encoder_runtime not in RUNTIME_NAMES:
            problems.append(f"encoder_runtime must be one of {list(RUNTIME_NAMES)}, not {self.encoder_runtime!r}")
        if self.image_base_dir is not None and not self.image_base_dir.is_dir():
            problems.append(f"image_base_dir {str(self.image_base_dir)!r} is not a directory")
        if self.image_fetch_concurrency < 1:
            problems.append("image_fetch_concurrency must be >= 1")
        if min(self.image_fetch_connect_timeout_seconds, self.image_fetch_read_timeout_seconds,
               self.image_fetch_timeout_seconds) <= 0:
            problems.append("image fetch timeouts must be > 0")
        if self.image_fetch_retries < 0 or self.image_fetch_max_redirects < 0:
            problems.append("image_fetch_retries and image_fetch_max_redirects must be >= 0")
        if self.moderation_alerts_buffer < 1:
            problems.append("moderation_alerts_buffer must be >= 1")
        if self.api_token is not None and self.api_token_file is not None:
            problems.append("set api_token or api_token_file, not both")
        try:
            self.api_token_value()
        except ConfigError as exc:
            problems.append(str(exc))
        if problems:
            raise ConfigError("invalid settings: " + "; ".join(problems))

    def _index_backend_problems(self) -> list[str]:
        if self.index_backend not in ("faiss", "milvus"):
            return [f"index_backend must be 'faiss' or 'milvus', not {self.index_backend!r}"]
        problems = []
        uri = self.milvus_uri
        if uri is not None:
            scheme = uri.partition("://")[0].lower() if "://" in uri else None
            if scheme is not None and scheme not in ("http", "https"):
                problems.append(f"milvus_uri {uri!r}: use http(s)://host:port for a Milvus server, "
                                "or a local path ending in .db for Milvus Lite")
            elif scheme is None and not uri.endswith(".db"):
                problems.append(f"milvus_uri {uri!r} is neither http(s)://host:port nor a local Milvus Lite "
                                "path ending in .db (a host:port needs http://)")
        if not self.milvus_prefix.replace("_", "").isalnum() or not self.milvus_prefix[:1].isalpha():
            problems.append(f"milvus_prefix must be letters, digits and _, starting with a letter, "
                            f"not {self.milvus_prefix!r}")
        if self.milvus_retry_seconds < 0:
            problems.append("milvus_retry_seconds must be >= 0")
        return problems

    @property
    def effective_milvus_uri(self) -> str:
        """``milvus_uri``, else the Milvus Lite file ``{state_dir}/milvus.db``."""
        return self.milvus_uri if self.milvus_uri is not None else str(self.state_dir / "milvus.db")

    def api_token_value(self) -> str | None:
        """The API's bearer token (``api_token``, or the first line of ``api_token_file``); None
        when the API is open. Raises ConfigError for an unreadable file or a token too short to
        resist guessing."""
        token = self.api_token
        if self.api_token_file is not None:
            try:
                lines = self.api_token_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read SAMESTYLE_API_TOKEN_FILE {str(self.api_token_file)!r}: {exc}") from None
            token = lines[0] if lines else ""
        if token is None:
            return None
        token = token.strip()
        if len(token) < MIN_API_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
            raise ConfigError(
                f"the API token must be at least {MIN_API_TOKEN_CHARS} printable ASCII characters without spaces "
                f"(got {len(token)} characters); make one with "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        return token

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
