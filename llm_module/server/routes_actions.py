"""jaseci 1.4's remote-action protocol over ``llm.ACTIONS``.

``actions load remote URL`` reads ``GET URL/jaseci_actions_spec/`` ({"llm.generate": ["prompt",
"**kwargs"], ...}); each hook then POSTs the parameters by name to ``URL/<action>`` (no
trailing slash; serv_actions registers ``/<action>/``, so both are served), a ``**kwargs``
parameter travelling as a key "**kwargs" that holds a dict. Answers are JSON either way:
the result, or ``{"error": {...}}`` with a 4xx/5xx status.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Extra, Field, create_model
from starlette.concurrency import run_in_threadpool

from llm_module import llm
from llm_module.errors import InvalidInput, suggest
from llm_module.server import guards
from llm_module.server.models import GenerateBody

log = logging.getLogger(__name__)

ACT_GROUP = "llm"
SPEC_PATH = "/jaseci_actions_spec/"
VAR_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
# Actions that may run while the start-up load failed: they fix it or only describe the state.
RUN_WITHOUT_MODEL = {"setup", "model_info", "list_jobs", "job_status", "cancel_job"}


class JSONAnyResponse(JSONResponse):
    """JSON that also takes Paths and other stray objects (as strings) instead of failing after the work."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, default=str).encode("utf-8")


def spec_names(func: Callable) -> list[str]:
    """Parameter names exactly as jaseci's gen_api_service lists them ("**kwargs" for var-keyword)."""
    return [str(p) if p.kind in VAR_KINDS else p.name for p in inspect.signature(func).parameters.values()]


def actions_spec(actions: dict[str, Callable]) -> dict[str, list[str]]:
    return {f"{ACT_GROUP}.{name}": spec_names(func) for name, func in actions.items()}


def bind_params(name: str, func: Callable, body: Any) -> dict:
    """Turn a hook's JSON body into keyword arguments for ``func``; refuse unknown or missing ones."""
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidInput(f"llm.{name} takes a JSON object of parameters, got {type(body).__name__}.")
    params = inspect.signature(func).parameters
    named = {p.name for p in params.values() if p.kind not in VAR_KINDS}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs: dict = {}
    for key, value in body.items():
        if key.startswith("**") and takes_kwargs:
            if not isinstance(value, dict):
                raise InvalidInput(f"{key} of llm.{name} must be an object, got {type(value).__name__}.")
            kwargs.update(value)
        elif key in named or takes_kwargs:  # plain HTTP clients may send options flat
            kwargs[key] = value
        else:
            raise InvalidInput(f"llm.{name} has no parameter {key!r}.{suggest(key, named)} "
                               f"It takes: {', '.join(spec_names(func)) or 'nothing'}.")
    missing = [p.name for p in params.values()
               if p.kind not in VAR_KINDS and p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise InvalidInput(f"llm.{name} needs {', '.join(missing)}.")
    return kwargs


def params_model(name: str, func: Callable) -> type[BaseModel]:
    """A pydantic model of ``func``'s parameters: the OpenAPI schema of its POST body."""
    fields: dict[str, Any] = {}
    for p in inspect.signature(func).parameters.values():
        annotation = Any if p.annotation is inspect.Parameter.empty else p.annotation
        if isinstance(annotation, str):  # postponed annotations: the schema only needs a rough type
            annotation = {"str": str, "dict": dict, "bool": bool, "list": list}.get(annotation, Any)
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            fields["kwargs"] = (dict[str, Any], Field(None, alias="**kwargs",
                                                      description="More options by name (jaseci sends them here)."))
        elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
            default = ... if p.default is inspect.Parameter.empty else p.default
            fields[p.name] = (annotation, default)
    config = type("Config", (), {"extra": Extra.allow, "title": f"llm.{name} parameters"})
    return create_model(f"llm_{name}_params", __config__=config, **fields)


def action_schema(name: str, func: Callable) -> dict:
    """The POST body schema; generate documents its options (which reach it through **kwargs)."""
    schema = params_model(name, func).schema(by_alias=True)
    if name == "generate":
        options = GenerateBody.schema()["properties"]
        schema["properties"] = {**options, **schema["properties"], "prompt": options["prompt"]}
        schema["description"] = "Options may be given flat or inside \"**kwargs\" (as jaseci sends them)."
    return schema


def _make_endpoint(app: FastAPI, name: str, func: Callable):
    async def call_action(request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise InvalidInput(f"The body of llm.{name} is not JSON ({exc}).") from exc
        kwargs = bind_params(name, func, body)
        started = time.perf_counter()
        result = await run_in_threadpool(run_action, app, name, func, kwargs)
        log.debug("llm.%s took %.3f s", name, time.perf_counter() - started)
        return JSONAnyResponse(result)

    call_action.__name__ = f"action_{name}"
    return call_action


def run_action(app: FastAPI, name: str, func: Callable, kwargs: dict) -> Any:
    """Blocking part of an action call (runs in the worker threadpool)."""
    settings, startup = app.state.settings, app.state.startup
    startup.wait(settings.ready_timeout_s)
    if name not in RUN_WITHOUT_MODEL:
        startup.require_loaded()
    return func(**guards.check_action(name, kwargs, settings))


def build_router(app: FastAPI, actions: dict[str, Callable] | None = None) -> APIRouter:
    actions = actions if actions is not None else llm.ACTIONS
    router = APIRouter(tags=["jaseci actions"])
    spec = actions_spec(actions)

    @router.get(SPEC_PATH, summary="Action names and parameters, for jaseci's `actions load remote`")
    async def jaseci_actions_spec() -> dict:
        return spec

    for name, func in actions.items():
        endpoint = _make_endpoint(app, name, func)
        doc = inspect.getdoc(func) or ""
        schema = action_schema(name, func)
        extra = {"requestBody": {"required": False, "content": {"application/json": {"schema": schema}}}}
        router.add_api_route(f"/{name}/", endpoint, methods=["POST"], summary=f"llm.{name}",
                             description=doc, openapi_extra=extra, response_class=JSONAnyResponse)
        # The hooks post without the trailing slash: answer there too rather than redirect.
        router.add_api_route(f"/{name}", endpoint, methods=["POST"], include_in_schema=False,
                             response_class=JSONAnyResponse)
    return router
