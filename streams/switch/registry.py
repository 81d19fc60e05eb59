"""Which encoders a worker has and which model it should serve.

:class:`ModelRegistry` holds the configured encoder (``SAMESTYLE_ENCODER``, the fallback) and the
encoders of promoted models by version, loads them on first use (seconds: callers run it on the
model thread, never on the event loop) and answers the *target* version: the newest promotion
that loads, else the configured encoder. :meth:`ModelRegistry.restore` takes the promotions an
index snapshot recorded (:mod:`~samestyle.streams.switch.record`) for a decision log that lost them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from samestyle.models.encoder import Encoder
from samestyle.models.factory import encoder_from_spec
from samestyle.streams.settings import Settings
from samestyle.streams.switch.record import RecordedModel, SwitchRecord
from samestyle.streams.switch.watcher import ModelWatcher, Promotion
from samestyle.topics.errors import ConfigError, SamestyleError

log = logging.getLogger(__name__)


class ModelRegistry:
    """The configured encoder, the promoted ones (loaded on demand) and the target version."""

    def __init__(self, settings: Settings, watcher: ModelWatcher, configured: Encoder | None = None,
                 on_load_failure: Callable[[], None] = lambda: None) -> None:
        self.settings = settings
        self.watcher = watcher
        self._configured = configured
        self._encoders: dict[str, Encoder] = {}
        self._on_load_failure = on_load_failure
        #: Promoted versions whose directory did not load: never the target.
        self.failed_versions: set[str] = set()
        #: The switch record of the index snapshot this worker started from (None: none).
        self.restored: SwitchRecord | None = None

    def configured_encoder(self) -> Encoder:
        """The encoder of ``settings.encoder`` (loads it on first use: call it off the event loop)."""
        if self._configured is None:
            self._configured = encoder_from_spec(self.settings.encoder, device=self.settings.device,
                                                 allow_random_weights=self.settings.allow_random_weights,
                                                 runtime=self.settings.encoder_runtime)
            log.info("encoder %s (dim %d) on %s", self._configured.version, self._configured.dim,
                     self._configured.device)
        return self._configured

    def encoder_for(self, version: str) -> Encoder:
        """The encoder of ``version`` (loads a promoted model directory on first use; off the loop).

        Raises ConfigError when the version is neither the configured encoder nor a promoted model.
        """
        if version in self._encoders:
            return self._encoders[version]
        if self._configured is not None and self._configured.version == version:
            return self._configured
        model_dir = self.watcher.chain.model_dir(version)
        if model_dir is None:
            configured = self.configured_encoder()
            if configured.version == version:
                return configured
            raise ConfigError(f"model {version!r} is neither SAMESTYLE_ENCODER ({configured.version}) nor a "
                              f"promoted model on {self.watcher.topic}")
        encoder = encoder_from_spec(model_dir, device=self.settings.device,
                                    allow_random_weights=self.settings.allow_random_weights,
                                    runtime=self.settings.encoder_runtime)
        if encoder.version != version:
            raise ConfigError(f"{model_dir} holds model {encoder.version}, but {version} was promoted from it")
        log.info("loaded promoted model %s (dim %d) from %s", version, encoder.dim, model_dir)
        self._encoders[version] = encoder
        return encoder

    def target_version(self) -> str | None:
        """The model this worker should serve: the newest promoted, else the configured one
        (None until the decision log and the configured encoder are known)."""
        if not self.watcher.ready.is_set():
            return None
        for promotion in reversed(self.watcher.chain.promotions):
            if promotion.version not in self.failed_versions:
                return promotion.version
        return self._configured.version if self._configured is not None else None

    def target_encoder(self) -> Encoder | None:
        """The target's encoder, loading it if needed (off the loop). A promoted model that does
        not load is logged, counted and skipped: the worker keeps serving what it serves."""
        while True:
            target = self.target_version()
            if target is None:
                return None
            try:
                return self.encoder_for(target)
            except SamestyleError as exc:
                if self._configured is not None and target == self._configured.version:
                    raise
                log.error("promoted model %s does not load, ignored: %s", target, exc)
                self.failed_versions.add(target)
                self._on_load_failure()

    def restore(self, record: SwitchRecord | None, serving: str | None) -> None:
        """Put the promotions an index snapshot recorded before any the decision log holds (call
        before the watcher starts), so a log that lost them still names the snapshot's target.

        A recorded model whose directory no longer exists is logged, counted as a load failure and
        not restored: the switch to it is abandoned and ``serving`` (the snapshot's active version)
        stays served. Nothing here raises: a restart must not crash-loop on its own snapshot.
        """
        if record is None:
            return
        self.restored = record
        kept = []
        for model in record.models:
            if Path(model.model_dir).exists():
                kept.append(Promotion(model.version, model.model_dir, -1))
                continue
            self._on_load_failure()
            if model.version == record.target and record.target != serving:
                log.error("model switch: the index snapshot records an unfinished switch to %s, but its model "
                          "directory %s no longer exists: the switch is abandoned, this worker keeps serving %s "
                          "(unless model-updates promotes another model)", model.version, model.model_dir, serving)
            else:
                log.error("model switch: the index snapshot records model %s from %s, which no longer exists: "
                          "not restored", model.version, model.model_dir)
        self.watcher.chain.restore(kept)

    def recorded_models(self, versions: Iterable[str | None]) -> tuple[RecordedModel, ...]:
        """The promoted models of ``versions`` (version and directory), in decision order, for a
        :class:`SwitchRecord`; versions that were never promoted (the configured one) are not listed."""
        wanted = {v for v in versions if v is not None}
        newest = {p.version: (i, p) for i, p in enumerate(self.watcher.chain.promotions) if p.version in wanted}
        return tuple(RecordedModel(p.version, p.model_dir) for _, p in sorted(newest.values(), key=lambda e: e[0]))

    def keep_only(self, versions: Iterable[str | None]) -> None:
        """Forget loaded promoted encoders not in ``versions`` (the configured one stays)."""
        keep = set(versions)
        for version in list(self._encoders):
            if version not in keep:
                del self._encoders[version]


__all__ = ["ModelRegistry"]
