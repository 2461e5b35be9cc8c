"""Token check and request-body cap, as plain ASGI middleware in front of every route.

Token: jaseci's remote hooks send no headers, so besides ``Authorization: Bearer <token>``
the token may lead the path: ``actions load remote http://host:port/t/<token>`` makes
every hook call ``/t/<token>/<action>``. The prefix is stripped before routing, so one
set of routes serves both. Comparison is constant-time (hmac.compare_digest).
"""

from __future__ import annotations

import hmac
import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_module.errors import PayloadTooLarge
from llm_module.server.errors import error_body

TOKEN_PREFIX = "/t/"
# Probes, self-description and the playground's static files stay open: they run no action and reveal no
# data (the playground asks for the token when the API answers 401).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json",
                          "/jaseci_actions_spec", "/jaseci_actions_spec/",
                          "/", "/ui", "/ui/", "/ui/app.js", "/ui/style.css", "/ui/favicon.svg"})


def tokens_match(given: str | None, expected: str) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            return credentials.strip() if scheme.lower() == "bearer" else None
    return None


def _split_token_prefix(path: str) -> tuple[str | None, str]:
    """'/t/<token>/rest' -> ('<token>', '/rest'); other paths -> (None, path)."""
    if not path.startswith(TOKEN_PREFIX):
        return None, path
    token, _, rest = path[len(TOKEN_PREFIX):].partition("/")
    return token, "/" + rest


async def _send_json(send: Send, status: int, body: dict, headers: list | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})


class TokenMiddleware:
    """Refuse every non-public request that lacks the token; strip a /t/<token> prefix."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path_token, path = _split_token_prefix(scope["path"])
        if path_token is not None:
            scope = {**scope, "path": path, "raw_path": path.encode()}
        if self.token and path not in PUBLIC_PATHS:
            given = path_token if path_token is not None else _bearer(scope)
            if not tokens_match(given, self.token):
                reason = "The token is wrong" if given else "This server needs a token"
                message = (f"{reason}: send 'Authorization: Bearer <token>', or for jaseci load the actions from "
                           "http://HOST:PORT/t/<token> (actions load remote URL sends no headers).")
                return await _send_json(send, 401, error_body(401, message, "unauthorized"),
                                        [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over ``max_bytes``: by Content-Length at once, else while they stream in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | str) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body ({size} bytes) is over this server's cap of {self.max_bytes} "
                               "bytes; send less (split prompts over several calls).")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, self._too_large(int(declared)).to_dict())
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(f"more than {received}")  # the LLMError handler answers 413
            return message

        return await self.app(scope, counting_receive, send)
