"""Bearer-token authentication of the worker's web server (``SAMESTYLE_API_TOKEN``).

With a token configured, every route but ``/health`` and ``/metrics`` (probes and scrapers) and the
login routes needs one of:

* ``Authorization: Bearer <token>`` — API clients (``curl -H "Authorization: Bearer $TOKEN"``);
* the page's session cookie — a browser signs in once on the login form (``GET /login``, also
  shown at ``/`` instead of the page), ``POST /login`` checks the token and sets an ``HttpOnly``,
  ``SameSite=Strict`` cookie; every later request of the page (its ``fetch`` calls and its
  thumbnail ``<img>`` tags alike) carries it without any script handling the token. The cookie's
  value is an HMAC of the token, not the token: it opens the page and the API, and changing the
  token signs every browser out. ``POST /logout`` drops it.

Comparisons are constant-time (:func:`hmac.compare_digest` on SHA-256 digests, so not even the
token's length leaks). A missing or wrong credential is a 401 JSON ``{"error", "status"}`` with a
``WWW-Authenticate: Bearer`` header (``error="invalid_token"`` when a wrong token was sent).
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from samestyle.streams.http.server import RouteRegistrar

log = logging.getLogger(__name__)

#: Reachable without a token: the probes, the scrapers and the way to sign in.
OPEN_PATHS = frozenset({"/health", "/metrics", "/login", "/logout"})
SESSION_COOKIE = "samestyle_session"
REALM = "samestyle"
_SESSION_MESSAGE = b"samestyle page session v1"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def token_matches(presented: str, token: str) -> bool:
    """Constant-time: equal digests, so neither content nor length shows in the timing."""
    return hmac.compare_digest(_digest(presented), _digest(token))


def session_value(token: str) -> str:
    """The page's cookie value for ``token`` (an HMAC of it, never the token itself)."""
    return hmac.new(token.encode("utf-8"), _SESSION_MESSAGE, hashlib.sha256).hexdigest()


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header; ``""`` for another scheme or a malformed
    header (a credential was sent, and it is not a valid one); None without the header."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return ""
    return value.strip()


def unauthorized(message: str, invalid_token: bool) -> web.Response:
    challenge = f'Bearer realm="{REALM}"' + (', error="invalid_token"' if invalid_token else "")
    return web.json_response({"error": message, "status": 401}, status=401,
                             headers={"WWW-Authenticate": challenge, "Cache-Control": "no-store"})


def login_page(error: str | None = None, status: int = 200) -> web.Response:
    """The sign-in form (self-contained: the page's own files are behind the token)."""
    notice = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>samestyle: sign in</title>
<style>body{{font:16px system-ui,sans-serif;max-width:26rem;margin:4rem auto;padding:0 1rem}}
input,button{{font:inherit;padding:.4rem}}input{{width:100%;box-sizing:border-box;margin:.5rem 0}}
.error{{color:#b00020}}</style></head>
<body><h1>samestyle</h1>{notice}
<form id="login" method="post" action="/login">
<label for="token">API token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button id="sign-in" type="submit">Sign in</button>
</form></body></html>"""
    return web.Response(text=body, content_type="text/html", status=status,
                        headers={"WWW-Authenticate": f'Bearer realm="{REALM}"', "Cache-Control": "no-store"}
                        if status == 401 else {"Cache-Control": "no-store"})


def token_auth(token: str | None) -> RouteRegistrar:
    """Require ``token`` on every route but :data:`OPEN_PATHS` (None: register nothing, the API is
    open). Its middleware goes first, so nothing else runs for an unauthenticated request."""
    if token is None:
        return lambda app: None
    cookie_value = session_value(token)

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        presented = bearer_token(request)
        if presented is not None:
            if token_matches(presented, token):
                return await handler(request)
            return unauthorized("the bearer token is not valid", invalid_token=True)
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie is not None and token_matches(cookie, cookie_value):
            return await handler(request)
        if request.method == "GET" and request.path == "/":
            return login_page(status=401)
        return unauthorized("authentication required: send 'Authorization: Bearer <token>' "
                            "(or sign in on the page)", invalid_token=False)

    async def show_login(request: web.Request) -> web.Response:
        return login_page()

    async def login(request: web.Request) -> web.StreamResponse:
        presented: object = None
        if request.content_type == "application/json":
            try:
                body = json.loads(await request.read() or b"{}")
            except (UnicodeDecodeError, json.JSONDecodeError):
                body = None
            presented = body.get("token") if isinstance(body, dict) else None
        else:
            presented = (await request.post()).get("token")
        if not isinstance(presented, str) or not token_matches(presented.strip(), token):
            log.warning("failed sign-in from %s", request.remote)
            return login_page("That is not the API token.", status=401)
        response = web.Response(status=303, headers={"Location": "/", "Cache-Control": "no-store"})
        response.set_cookie(SESSION_COOKIE, cookie_value, httponly=True, samesite="Strict", path="/",
                            secure=request.secure)
        return response

    async def logout(request: web.Request) -> web.StreamResponse:
        response = web.Response(status=303, headers={"Location": "/login", "Cache-Control": "no-store"})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    def register(app: web.Application) -> None:
        app.middlewares.insert(0, require_token)
        app.router.add_get("/login", show_login)
        app.router.add_post("/login", login)
        app.router.add_post("/logout", logout)

    return register


__all__ = ["OPEN_PATHS", "SESSION_COOKIE", "bearer_token", "session_value", "token_auth", "token_matches"]
