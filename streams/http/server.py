"""The worker's HTTP server: one aiohttp application served by a :class:`mode.Service` inside the
worker process, on ``settings.web_port`` (0 = no server).

Routes come from *route registrars*, plain functions ``(web.Application) -> None``, so other
features add their endpoints to the same server without touching this module::

    def my_routes(...):
        def register(app: web.Application) -> None:
            app.router.add_get("/mine", handler)
        return register

    WebServer(settings, [core_routes(registry, health), my_routes(...)])

:func:`core_routes` serves ``/metrics`` (Prometheus text format) and ``/health``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Callable, Sequence

from aiohttp import web
from mode import Service
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from samestyle.streams.settings import Settings

log = logging.getLogger(__name__)

RouteRegistrar = Callable[[web.Application], None]


class WebServer(Service):
    """Serves an aiohttp application for the lifetime of the worker."""

    def __init__(self, settings: Settings, registrars: Sequence[RouteRegistrar], host: str = "0.0.0.0",
                 client_max_size: int = 1024 ** 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.host = host
        #: aiohttp answers 413 to a larger request body (and drains it, so the client reads that).
        self.web_app = web.Application(client_max_size=client_max_size)
        for register in registrars:
            register(self.web_app)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def add_routes(self, register: RouteRegistrar) -> None:
        """Add routes before the server starts (aiohttp freezes the router at start)."""
        register(self.web_app)

    async def on_start(self) -> None:
        self._runner = web.AppRunner(self.web_app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.settings.web_port, reuse_address=True)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # the bound port, for port 0 in tests
        self.port = sockets[0].getsockname()[1] if sockets else self.settings.web_port
        log.info("web server listening on http://%s:%d (/metrics, /health)", self.host, self.port)

    async def on_stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def core_routes(registry: CollectorRegistry, health_of: Callable[[], Mapping[str, Any]]) -> RouteRegistrar:
    """``/metrics`` (the ``registry`` in Prometheus text format) and ``/health`` (``health_of()``;
    503 unless its ``ok`` is true)."""

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def health(request: web.Request) -> web.Response:
        status = dict(health_of())
        return web.json_response(status, status=200 if status["ok"] else 503)

    def register(app: web.Application) -> None:
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/health", health)

    return register


__all__ = ["WebServer", "RouteRegistrar", "core_routes"]
