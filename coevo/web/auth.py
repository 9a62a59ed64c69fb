"""The review app's gate: a random token on every request (as Jupyter does), and CSRF checks on
every state-changing request.

- The token comes in the URL the server prints (`?token=...`), which sets an HttpOnly,
  SameSite=Strict cookie, so later links need not carry it; scripts may send
  `Authorization: token ...` instead. Anything else gets 403.
- A POST must carry the CSRF value (the form field `csrf`, or the `X-CSRF-Token` header htmx
  sends), derived from the token and never stored in a cookie, so another site cannot forge
  one; a POST whose Origin is not this server's is refused as well.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

COOKIE = "coevo_token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def new_token() -> str:
    return secrets.token_hex(24)


def csrf_value(token: str) -> str:
    """The CSRF value pages embed in their forms: a keyed hash of the token."""
    return hmac.new(token.encode(), b"coevo-csrf", hashlib.sha256).hexdigest()[:32]


class TokenGate:
    """ASGI middleware: 403 without the token; the token in a URL becomes a cookie."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        given = request.query_params.get("token")
        if given is not None and hmac.compare_digest(given, self.token):
            # Drop the token from the address bar (and from history and referrers).
            query = urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
            target = request.url.path + (f"?{query}" if query else "")
            response: Response = RedirectResponse(target, status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            await response(scope, receive, send)
            return
        header = request.headers.get("authorization", "")
        offered = request.cookies.get(COOKIE) or (header[6:].strip() if header.lower().startswith("token ") else "")
        if not (offered and hmac.compare_digest(offered, self.token)):
            await PlainTextResponse(
                "403: this coevo serve needs its token: open the URL it printed (http://host:port/?token=...)",
                status_code=403,
            )(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def check_csrf(request: Request, token: str) -> str | None:
    """Why a state-changing request is refused, or None when it carries a valid CSRF value
    from this server's pages."""
    origin = request.headers.get("origin")
    if origin and origin != "null":
        host = request.headers.get("host", "")
        if origin.split("://", 1)[-1] != host:
            return f"cross-origin request from {origin} refused"
    sent = request.headers.get("x-csrf-token")
    if sent is None:
        form = await request.form()
        value = form.get("csrf")
        sent = value if isinstance(value, str) else None
    if not sent or not hmac.compare_digest(sent, csrf_value(token)):
        return "missing or wrong CSRF value: reload the page and submit again"
    return None
