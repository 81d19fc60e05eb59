"""Bearer-token authentication of the worker's web server: the aiohttp app as the worker builds it
(auth, /metrics and /health, the search routes), driven by aiohttp's test client."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from samestyle.streams.http import auth
from samestyle.streams.http.auth import SESSION_COOKIE, session_value, token_auth, token_matches
from samestyle.streams.http.moderation import AlertBuffer, moderation_routes
from samestyle.streams.http.search import search_routes
from samestyle.streams.http.server import core_routes
from samestyle.streams.settings import Settings
from samestyle.streams.worker.metrics import Metrics
from samestyle.topics.errors import ConfigError

TOKEN = "s3cret-token-0123456789abcdef"


class NoIndex:
    """A search backend whose index is not loaded: an authorised request gets the API's 503."""

    index = None
    serving_version = None

    async def encoder_for(self, version: str) -> Any:
        raise AssertionError("not reached")

    async def run_model(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise AssertionError("not reached")

    def lag_by_consumer(self) -> dict[str, int]:
        return {}


def build_app(tmp_path: Path, token: str | None) -> web.Application:
    settings = Settings(state_dir=tmp_path, api_token=token)
    def health() -> dict[str, Any]:
        return {"ok": True, "index_vectors": 0, "model_version": None, "replica": "running"}

    app = web.Application()
    for register in (token_auth(settings.api_token_value()), core_routes(Metrics(process=False).registry, health),
                     search_routes(settings, NoIndex(), health),  # type: ignore[arg-type]
                     moderation_routes(AlertBuffer(10), lambda listing_id: None, send=None)):  # type: ignore[arg-type]
        register(app)
    return app


def with_client(tmp_path: Path, token: str | None,
                check: Callable[[TestClient], Awaitable[None]]) -> None:
    async def run() -> None:
        async with TestClient(TestServer(build_app(tmp_path, token))) as client:
            await check(client)

    asyncio.run(run())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_without_a_token_the_api_is_open(tmp_path: Path) -> None:
    async def check(client: TestClient) -> None:
        r = await client.get("/listings/x")
        assert r.status == 503  # reached the API
        r = await client.get("/")
        assert r.status == 200 and "samestyle search" in await r.text()

    with_client(tmp_path, None, check)


def test_health_and_metrics_stay_open(tmp_path: Path) -> None:
    async def check(client: TestClient) -> None:
        r = await client.get("/health")
        assert r.status == 200 and (await r.json())["ok"] is True
        r = await client.get("/metrics")
        assert r.status == 200 and "samestyle_" in await r.text()
        r = await client.get("/health", headers=bearer("wrong"))  # a wrong token does not close them either
        assert r.status == 200

    with_client(tmp_path, TOKEN, check)


@pytest.mark.parametrize("method, path", [
    ("POST", "/search"), ("GET", "/listings/x"), ("GET", "/listings/x/similar"), ("GET", "/listings/x/duplicates"),
    ("GET", "/listings/x/thumbnail"), ("GET", "/stats"), ("GET", "/openapi.json"), ("GET", "/static/app.js"),
    ("GET", "/moderation/alerts"), ("POST", "/moderation/decisions"),
    ("GET", "/no-such-route"),  # no 404: unauthenticated clients learn nothing about the routes
])
def test_every_other_route_needs_the_token(tmp_path: Path, method: str, path: str) -> None:
    async def check(client: TestClient) -> None:
        r = await client.request(method, path)
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="samestyle"'
        body = await r.json()
        assert body["status"] == 401 and "Authorization: Bearer" in body["error"]
        r = await client.request(method, path, headers=bearer(TOKEN))
        assert r.status != 401

    with_client(tmp_path, TOKEN, check)


@pytest.mark.parametrize("header", [
    f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN.upper()}", "Bearer ", "Bearer", f"Basic {TOKEN}",
    f"Token {TOKEN}", TOKEN, "Bearer " + "é" * 30, "Bearer " + "a" * 4_000,
])
def test_a_wrong_credential_is_a_401_with_invalid_token(tmp_path: Path, header: str) -> None:
    async def check(client: TestClient) -> None:
        r = await client.get("/listings/x", headers={"Authorization": header})
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == 'Bearer realm="samestyle", error="invalid_token"'
        assert (await r.json()) == {"error": "the bearer token is not valid", "status": 401}

    with_client(tmp_path, TOKEN, check)


def test_a_header_over_aiohttp_s_line_limit_is_a_400_before_any_handler(tmp_path: Path) -> None:
    async def check(client: TestClient) -> None:
        r = await client.get("/listings/x", headers={"Authorization": "Bearer " + "a" * 10_000})
        assert r.status == 400 and "Got more than 8190 bytes" in await r.text()

    with_client(tmp_path, TOKEN, check)


def test_the_right_token_passes_with_any_scheme_case(tmp_path: Path) -> None:
    async def check(client: TestClient) -> None:
        for header in (f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER  {TOKEN} "):
            r = await client.get("/listings/x", headers={"Authorization": header})
            assert r.status == 503, header  # the API's own answer: the index is not loaded
        r = await client.post("/search", json={}, headers=bearer(TOKEN))
        assert r.status == 400 and "no query" in (await r.json())["error"]

    with_client(tmp_path, TOKEN, check)


def test_the_page_signs_in_with_a_cookie_that_is_not_the_token(tmp_path: Path) -> None:
    async def check(client: TestClient) -> None:
        r = await client.get("/")
        assert r.status == 401 and 'action="/login"' in await r.text()  # the sign-in form, not the page
        r = await client.get("/login")
        assert r.status == 200 and 'name="token"' in await r.text()
        r = await client.post("/login", data={"token": "guess"}, allow_redirects=False)
        assert r.status == 401 and "not the API token" in await r.text()
        assert SESSION_COOKIE not in r.cookies
        r = await client.post("/login", data={"token": TOKEN}, allow_redirects=False)
        assert r.status == 303 and r.headers["Location"] == "/"
        cookie = r.cookies[SESSION_COOKIE]
        assert cookie.value == session_value(TOKEN) and TOKEN not in cookie.value
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
        # The browser now carries the cookie on every request of the page: HTML, script, API calls.
        r = await client.get("/")
        assert r.status == 200 and "samestyle search" in await r.text()
        assert (await client.get("/static/app.js")).status == 200
        assert (await client.get("/listings/x")).status == 503
        r = await client.post("/logout", allow_redirects=False)
        assert r.status == 303
        assert (await client.get("/listings/x")).status == 401

    with_client(tmp_path, TOKEN, check)


@pytest.mark.parametrize("cookie", ["forged", TOKEN, session_value(TOKEN + "x"), session_value(TOKEN)[:-1], ""])
def test_a_forged_cookie_is_refused(tmp_path: Path, cookie: str) -> None:
    async def check(client: TestClient) -> None:
        r = await client.get("/listings/x", headers={"Cookie": f"{SESSION_COOKIE}={cookie}"})
        assert r.status == 401

    with_client(tmp_path, TOKEN, check)


def test_login_takes_json_too_and_refuses_anything_else(tmp_path: Path) -> None:
    async def check(client: TestClient) -> None:
        r = await client.post("/login", json={"token": TOKEN}, allow_redirects=False)
        assert r.status == 303
        for bad in ({"token": 12345}, {"token": None}, ["token"], {}):
            r = await client.post("/login", json=bad, allow_redirects=False)
            assert r.status == 401, bad
        r = await client.post("/login", data=b"{not json", headers={"Content-Type": "application/json"},
                              allow_redirects=False)
        assert r.status == 401

    with_client(tmp_path, TOKEN, check)


def test_comparisons_are_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert token_matches(TOKEN, TOKEN) and not token_matches("short", TOKEN)
    # Digests of equal length are compared, so not even the token's length shows in the timing.
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)


def test_the_token_comes_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert Settings.from_env({}).api_token_value() is None
    assert Settings.from_env({"SAMESTYLE_API_TOKEN": f" {TOKEN}\n"}).api_token_value() == TOKEN
    secret = tmp_path / "token"
    secret.write_text(f"{TOKEN}\n")
    assert Settings.from_env({"SAMESTYLE_API_TOKEN_FILE": str(secret)}).api_token_value() == TOKEN
    assert TOKEN not in repr(Settings(api_token=TOKEN))


@pytest.mark.parametrize("env, message", [
    ({"SAMESTYLE_API_TOKEN": "short"}, "at least 16"),
    ({"SAMESTYLE_API_TOKEN": "sixteen chars but spaces"}, "without spaces"),
    ({"SAMESTYLE_API_TOKEN": TOKEN, "SAMESTYLE_API_TOKEN_FILE": "/etc/hostname"}, "not both"),
    ({"SAMESTYLE_API_TOKEN_FILE": "/no/such/token"}, "cannot read SAMESTYLE_API_TOKEN_FILE"),
])
def test_bad_token_settings_fail_with_a_clear_message(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_an_empty_token_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("")
    with pytest.raises(ConfigError, match="at least 16"):
        Settings(api_token_file=empty)
