"""Every error leaves the service as JSON: ``{"error": {"type", "message", "status"}}``.

jaseci's remote hook returns ``res.json()`` whatever the status code, so a JSON body is
the only way the message reaches a walker (a plain-text 500 becomes a JSONDecodeError).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_module.errors import LLMError

log = logging.getLogger(__name__)

_HTTP_KINDS = {400: "invalid_input", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 503: "not_ready"}


class Unauthorized(LLMError):
    status = 401
    kind = "unauthorized"


def error_body(status: int, message: str, kind: str | None = None) -> dict:
    return {"error": {"type": kind or _HTTP_KINDS.get(status, "error"), "message": message, "status": status}}


def error_response(status: int, message: str, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind), status_code=status, headers=headers)


async def _llm_error(request: Request, exc: LLMError) -> JSONResponse:
    if exc.status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc'] if p != 'body') or 'body'}: {err['msg']}" for err in exc.errors()
    )
    return error_response(422, f"The request does not match the schema ({problems}); see /docs.", "invalid_input")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"No endpoint {request.method} {request.url.path}; see /docs for the endpoints."
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see /docs."
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Ours, not the caller's: say what broke without a traceback; the log has the details.
    log.exception("%s %s crashed", request.method, request.url.path)
    return error_response(500, f"Internal error ({type(exc).__name__}: {exc}). The server log has the details.",
                          "internal_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LLMError, _llm_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
