"""jaseci 1.4's remote-action protocol over ``llm_module.actions.ACTIONS`` and the app's engine.

``actions load remote URL`` reads ``GET URL/jaseci_actions_spec/`` ({"llm.generate": ["prompt",
"**kwargs"], ...}); each hook then POSTs the parameters by name to ``URL/<action>`` (no
trailing slash; serv_actions registers ``/<action>/``, so both are served), a ``**kwargs``
parameter travelling as a key "**kwargs" that holds a dict. Answers are JSON either way:
the result, or ``{"error": {...}}`` with a 4xx/5xx status. The protocol is plain HTTP: serving it
needs no jaseci.
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

from llm_module.actions import ACTIONS
from llm_module.errors import InvalidInput, suggest
from llm_module.options import Limits
from llm_module.server import guards
from llm_module.server.errors import documented
from llm_module.server.schemas import ACTION_BODIES, export_rule

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


def parameters(func: Callable) -> list[inspect.Parameter]:
    """An action's parameters as walkers see them (without the engine it is given)."""
    return list(inspect.signature(func).parameters.values())[1:]


def spec_names(func: Callable) -> list[str]:
    """Parameter names exactly as jaseci's gen_api_service lists them ("**kwargs" for var-keyword)."""
    return [str(p) if p.kind in VAR_KINDS else p.name for p in parameters(func)]


def actions_spec(actions: dict[str, Callable]) -> dict[str, list[str]]:
    return {f"{ACT_GROUP}.{name}": spec_names(func) for name, func in actions.items()}


def bind_params(name: str, func: Callable, body: Any, overridden: list | None = None) -> dict:
    """Turn a hook's JSON body into keyword arguments for ``func``; refuse unknown or missing ones.

    An option given both flat and inside "**kwargs": the later one counts; the one it replaces is appended
    to ``overridden`` as (key, value), for the caller to check too.
    """
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InvalidInput(f"llm.{name} takes a JSON object of parameters, got {type(body).__name__}.")
    params = parameters(func)
    named = {p.name for p in params if p.kind not in VAR_KINDS}
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    kwargs: dict = {}
    replaced = overridden if overridden is not None else []
    for key, value in body.items():
        if key.startswith("**") and takes_kwargs:
            if not isinstance(value, dict):
                raise InvalidInput(f"{key} of llm.{name} must be an object, got {type(value).__name__}.")
            replaced.extend((k, kwargs[k]) for k in value if k in kwargs)
            kwargs.update(value)
        elif key in named or takes_kwargs:  # plain HTTP clients may send options flat
            if key in kwargs:
                replaced.append((key, kwargs[key]))
            kwargs[key] = value
        else:
            raise InvalidInput(f"llm.{name} has no parameter {key!r}.{suggest(key, named)} "
                               f"It takes: {', '.join(spec_names(func)) or 'nothing'}.")
    missing = [p.name for p in params
               if p.kind not in VAR_KINDS and p.default is inspect.Parameter.empty and p.name not in kwargs]
    if missing:
        raise InvalidInput(f"llm.{name} needs {', '.join(missing)}.")
    return kwargs


def check_overridden(name: str, overridden: list, settings) -> None:
    """An option given twice (flat and inside "**kwargs") counts once, but both must be valid: the engine checks
    the one that counts; this checks the other as the schema states it (schemas.ACTION_BODIES and the caps)."""
    params, options = ACTION_BODIES.get(name, (None, None))
    limits = Limits.from_settings(settings)
    for key, value in overridden:
        model = options if options is not None and key in options.__fields__ else params
        field = model.__fields__.get(key) if model is not None else None
        if field is None:
            continue
        _, error = field.validate(value, {}, loc=key, cls=model)
        try:
            if error:
                raise InvalidInput(f"{value!r} does not fit its schema")
            if key in ("max_new_tokens", "num_return_sequences", "num_beams") and value is not None:
                limits.check_options({key: value}, {key})
            if key == "messages" and value is not None:
                limits.check_chat([{"content": m.get("content")} for m in value], None)
        except InvalidInput as exc:
            raise InvalidInput(f"llm.{name} got {key!r} twice, flat and inside \"**kwargs\", and the one that does "
                               f"not count is not valid either ({exc}). Give it once.") from None


def params_model(name: str, func: Callable) -> type[BaseModel]:
    """A pydantic model of ``func``'s parameters, from its signature (for an action schemas.py does not describe)."""
    fields: dict[str, Any] = {}
    for p in parameters(func):
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
    """The POST body schema (with pydantic's ``definitions``): the named parameters, and for an action with
    **kwargs its options, flat or inside "**kwargs" (as jaseci's hook sends them)."""
    if name not in ACTION_BODIES:
        return params_model(name, func).schema(by_alias=True)
    params, options = ACTION_BODIES[name]
    schema = params.schema(by_alias=True)
    schema["title"] = f"llm.{name} parameters"
    if options is not None:
        nested = options.schema(by_alias=True)
        for key in schema["properties"]:  # a named parameter is given by name, not among the options
            nested["properties"].pop(key, None)
        schema["definitions"] = {**schema.get("definitions", {}), **nested.pop("definitions", {}),
                                 options.__name__: nested}
        schema["properties"] = {**nested["properties"], **schema["properties"], KWARGS: {
            "$ref": f"#/definitions/{options.__name__}",
            "description": "The options, as jaseci's hook sends them."}}
        # Given at both levels, an option's later one counts and the other must be valid too (check_overridden).
        schema["description"] = "Options may be given flat or inside \"**kwargs\" (as jaseci sends them)."
        if name == "generate":
            schema["anyOf"] = _prompt_or_messages(schema["properties"]["prompt"])
        elif name == "export":
            schema["anyOf"] = export_rule(KWARGS)
    return schema


KWARGS = "**kwargs"


def _prompt_or_messages(prompt: dict) -> list[dict]:
    """llm.generate's rule: a prompt, or messages (flat or inside "**kwargs") with no prompt."""
    given = [branch for branch in prompt["anyOf"] if branch.get("type") != "null" and branch.get("maxLength") != 0]
    no_messages = {"messages": {"type": "null"}, KWARGS: {"properties": {"messages": {"type": "null"}}}}
    messages = {"type": "array"}
    return [{"required": ["prompt"], "properties": {"prompt": {"anyOf": given}, **no_messages}},
            {"required": ["messages"], "properties": {"prompt": {"enum": [None, ""]}, "messages": messages}},
            {"required": [KWARGS], "properties": {"prompt": {"enum": [None, ""]}, KWARGS: {
                "required": ["messages"], "properties": {"messages": messages}}}}]


# The error statuses of each action besides 400 (a body that is not a JSON object of its parameters),
# 413 (the body cap) and 503 (the model is not loaded).
ACTION_ERRORS = {
    "setup": (403, 404, 409, 500), "generate": (404, 409), "train": (403, 404, 409), "evaluate": (403, 404, 409),
    "export": (403, 404, 409),
    "load_adapter": (403, 404, 409), "unload_adapter": (404, 409), "set_default_adapter": (404,),
    "job_status": (404,), "cancel_job": (404, 409), "augment": (403, 404, 409),
    "select_informative": (403, 404, 409),
}


def _make_endpoint(app: FastAPI, name: str, func: Callable):
    async def call_action(request: Request) -> JSONResponse:
        raw = await request.body()
        try:
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as exc:
            raise InvalidInput(f"The body of llm.{name} is not JSON ({exc}).") from exc
        if body is None:
            raise InvalidInput(f"llm.{name} takes a JSON object of parameters, got null.")
        overridden: list = []
        kwargs = bind_params(name, func, body, overridden)
        check_overridden(name, overridden, app.state.settings)
        started = time.perf_counter()
        result = await run_in_threadpool(run_action, app, name, kwargs)
        log.debug("llm.%s took %.3f s", name, time.perf_counter() - started)
        return JSONAnyResponse(result)

    call_action.__name__ = f"action_{name}"
    return call_action


def run_action(app: FastAPI, name: str, kwargs: dict) -> Any:
    """Blocking part of an action call (runs in the worker threadpool), on the app's engine."""
    settings, startup = app.state.settings, app.state.startup
    startup.wait(settings.ready_timeout_s)
    if name not in RUN_WITHOUT_MODEL:
        startup.require_loaded()
    return ACTIONS[name](app.state.engine, **guards.check_action(name, kwargs, settings))


def build_router(app: FastAPI, actions: dict[str, Callable] | None = None) -> APIRouter:
    actions = actions if actions is not None else ACTIONS
    router = APIRouter(tags=["jaseci actions"])
    spec = actions_spec(actions)

    @router.get(SPEC_PATH, summary="Action names and parameters, for jaseci's `actions load remote`")
    async def jaseci_actions_spec() -> dict:
        return spec

    for name, func in actions.items():
        endpoint = _make_endpoint(app, name, func)
        doc = inspect.getdoc(func) or ""
        schema = action_schema(name, func)
        # An empty body is {}: required only when the action has required parameters.
        required = bool(schema.get("required"))
        extra = {"requestBody": {"required": required, "content": {"application/json": {"schema": schema}}}}
        errors = documented(*sorted({400, 413, 503, *ACTION_ERRORS.get(name, ())}))
        router.add_api_route(f"/{name}/", endpoint, methods=["POST"], summary=f"llm.{name}",
                             description=doc, openapi_extra=extra, response_class=JSONAnyResponse,
                             responses=errors)
        # The hooks post without the trailing slash: answer there too rather than redirect.
        router.add_api_route(f"/{name}", endpoint, methods=["POST"], include_in_schema=False,
                             response_class=JSONAnyResponse)
    return router
