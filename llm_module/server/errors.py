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
from starlette.routing import Match

from llm_module import errors
from llm_module.errors import LLMError, Overloaded

log = logging.getLogger(__name__)

_HTTP_KINDS = {400: "invalid_input", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large", 503: "not_ready"}


# What each error status means here (the OpenAPI descriptions of the error answers).
ERROR_DESCRIPTIONS = {
    400: "Invalid input: the message names the field and the fix.",
    401: "No token, or a wrong one (Authorization: Bearer <token>, or the /t/<token>/ path prefix).",
    403: "Refused: a path outside the data root, or an option this server does not allow.",
    404: "Not found: no such adapter, job, model or file.",
    405: "Method not allowed: the Allow header lists the methods of this path.",
    409: "Conflict with the server's state: a name already taken, a job in the wrong state, a setup running.",
    413: "The request body, or a prompt, is over this server's caps.",
    422: "The body does not match the schema: the message names the field.",
    500: "The model could not be loaded.",
    503: "Not ready (the model is loading or failed to load), or overloaded (see Retry-After).",
}


def documented(*statuses: int) -> dict:
    """The ``responses`` of a route that may answer these error statuses (each with the error body)."""
    from llm_module.server.schemas import ErrorBody

    return {status: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[status]} for status in statuses}


def error_body(status: int, message: str, kind: str | None = None, param: str | None = None) -> dict:
    return errors.error_body(status, message, kind or _HTTP_KINDS.get(status, "error"), param)


def error_response(status: int, message: str, kind: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, kind), status_code=status, headers=headers)


async def _llm_error(request: Request, exc: LLMError) -> JSONResponse:
    if exc.status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc)
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=error_headers(exc))


def error_headers(exc: LLMError) -> dict | None:
    """Headers an error answer carries: when to retry after an overload."""
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(max(1, round(exc.retry_after)))}
    return None


# Routes that answer a body that does not fit their schema with 400, as OpenAI's API does (others: 422).
BAD_REQUEST_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/load_lora_adapter",
                               "/v1/unload_lora_adapter"})


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    fields = ['.'.join(str(p) for p in err["loc"] if p != "body") or "body" for err in exc.errors()]
    problems = "; ".join(f"{field}: {err['msg']}" for field, err in zip(fields, exc.errors(), strict=True))
    status = 400 if request.url.path in BAD_REQUEST_PATHS else 422
    return JSONResponse(error_body(status, f"The request does not match the schema ({problems}); see /docs.",
                                   "invalid_input", fields[0] if fields else None), status_code=status)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 404 and message == "Not Found":
        message = f"No endpoint {request.method} {request.url.path}; see /docs for the endpoints."
    elif exc.status_code == 405:
        allowed = allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        message = f"{request.method} is not allowed on {request.url.path}; it takes {', '.join(allowed)} (see /docs)."
    return error_response(exc.status_code, message, headers=headers or None)


def allowed_methods(request: Request) -> list[str]:
    """The methods of a path, as its OpenAPI entry lists them: a fixed path's routes (``/v1/adapters/default``)
    win over a templated one that also matches it (``/v1/adapters/{name}``), as OpenAPI matches paths."""
    matching = [route for route in request.app.router.routes
                if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE]
    fixed = [route for route in matching if not getattr(route, "param_convertors", None)]
    methods = {method for route in (fixed or matching) for method in route.methods}
    return sorted(methods)


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
