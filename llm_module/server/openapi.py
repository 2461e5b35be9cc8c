"""The app's OpenAPI document, exact enough to fuzz: what FastAPI generates, then made to tell the truth.

* error answers: every status a route may answer is documented with the one error body
  (``{"error": {...}}``); FastAPI's default 422 body (``{"detail": [...]}``), which this server never
  sends, is replaced, and the OpenAI routes answer a body that does not fit with 400, not 422;
* every route that reads a body may answer 413 (the body cap), and with a token every route but the
  public ones answers 401 without it (a bearer security scheme);
* the jaseci action bodies (built by pydantic, with ``#/definitions`` references) get their
  definitions moved under ``#/components/schemas``;
* the server's caps (settings: max_new_tokens, max_prompt_chars, ...) become maxima of the fields
  they cap, so a request the schema allows is one this server serves.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from llm_module.server.errors import BAD_REQUEST_PATHS, ERROR_DESCRIPTIONS
from llm_module.server.schemas import ErrorBody
from llm_module.server.security import PUBLIC_PATHS

ERROR_REF = "#/components/schemas/ErrorBody"
BODY_METHODS = ("post", "put", "patch")
SECURITY_SCHEME = "bearerAuth"


def install_openapi(app: FastAPI) -> None:
    """``app.openapi()`` answers (and caches) the document below."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi


def build_openapi(app: FastAPI) -> dict:
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorBody"] = _hoist(ErrorBody.schema(), components)
    settings = app.state.settings
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            _document_errors(path, method, operation, components, protected=bool(settings.token))
    for schema in _body_schemas(doc):
        _apply_caps(schema, settings)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    if settings.token:
        doc["components"]["securitySchemes"] = {
            SECURITY_SCHEME: {"type": "http", "scheme": "bearer",
                              "description": "The server's token; jaseci's remote actions put it in the path "
                                             "instead: http://HOST:PORT/t/<token>/..."}}
        doc["security"] = [{SECURITY_SCHEME: []}]
    return doc


# ------------------------------------------------------------------ errors
def _document_errors(path: str, method: str, operation: dict, components: dict, protected: bool) -> None:
    responses = operation.setdefault("responses", {})
    body = operation.get("requestBody")
    if body is not None:
        for media in body.get("content", {}).values():
            if "schema" in media:
                media["schema"] = _hoist(media["schema"], components)
    if "422" in responses:
        if path in BAD_REQUEST_PATHS:  # these answer a body that does not fit with 400, as OpenAI's API does
            del responses["422"]
            responses.setdefault("400", {})
        else:
            responses["422"] = {}
    if body is not None:  # a body that is not JSON (or not UTF-8) is refused before its schema is checked
        responses.setdefault("400", {})
    if body is not None or method in BODY_METHODS:
        responses.setdefault("413", {})
    public = path in PUBLIC_PATHS
    if protected:
        if public:
            operation["security"] = []
        else:
            responses.setdefault("401", {})
    for status, response in responses.items():
        if status.isdigit() and int(status) >= 400:
            response.setdefault("description", ERROR_DESCRIPTIONS.get(int(status), "Error"))
            schema = response.get("content", {}).get("application/json", {}).get("schema") or {}
            if not schema or schema.get("$ref", "").endswith("ValidationError"):
                response["content"] = {"application/json": {"schema": {"$ref": ERROR_REF}}}


def _hoist(schema: dict, components: dict) -> dict:
    """A pydantic schema with its ``definitions`` moved into ``components`` (references rewritten)."""
    schema = copy.deepcopy(schema)
    definitions = schema.pop("definitions", {})
    for name, definition in definitions.items():
        components.setdefault(name, _rewrite_refs(definition))
    return _rewrite_refs(schema)


def _rewrite_refs(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: (v.replace("#/definitions/", "#/components/schemas/") if k == "$ref" and isinstance(v, str)
                    else _rewrite_refs(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rewrite_refs(v) for v in node]
    return node


# ------------------------------------------------------------------ caps
def _body_schemas(doc: dict):
    """Every object schema of the document: components, request bodies, and what they nest."""
    stack: list[Any] = [doc["components"]["schemas"]]
    for operations in doc["paths"].values():
        for operation in operations.values():
            stack.append(operation.get("requestBody", {}))
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("properties"), dict):
                yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _apply_caps(schema: dict, settings) -> None:
    sequences = min(settings.max_return_sequences, settings.max_batch)
    caps = {"max_new_tokens": {"maximum": settings.max_new_tokens},
            "max_tokens": {"maximum": settings.max_new_tokens},
            "max_completion_tokens": {"maximum": settings.max_new_tokens},
            "num_return_sequences": {"maximum": sequences}, "n": {"maximum": sequences},
            "num_beams": {"maximum": settings.max_return_sequences},
            "best_of": {"maximum": sequences}}
    texts = {"prompt"}  # (system_prompt counts only with chat=true: its cap is not a property of the field)
    for name, prop in schema["properties"].items():
        if not isinstance(prop, dict):  # false: "not this property" (routes_actions: each option once)
            continue
        if name in caps:
            for branch in _branches(prop, "integer"):
                branch["maximum"] = min(branch.get("maximum", caps[name]["maximum"]), caps[name]["maximum"])
        elif name in texts:
            for branch in _branches(prop, "string"):
                branch["maxLength"] = min(branch.get("maxLength", settings.max_prompt_chars), settings.max_prompt_chars)
            for branch in _branches(prop, "array"):
                branch["maxItems"] = settings.max_prompts
                for item in _branches(branch.get("items", {}), "string"):
                    item["maxLength"] = settings.max_prompt_chars
    if schema.get("title") in ("GenerateBody", "StreamBody"):
        # Options.check_options: without max_new_tokens, max_length is capped like it.
        schema.setdefault("allOf", []).append({
            "description": f"max_length over {settings.max_new_tokens} needs max_new_tokens.",
            "anyOf": [{"required": ["max_new_tokens"], "properties": {"max_new_tokens": {"type": "integer"}}},
                      {"properties": {"max_length": {"anyOf": [{"type": "null"},
                                                               {"maximum": settings.max_new_tokens}]}}}]})
    if set(schema["properties"]) >= {"role", "content"} and isinstance(schema["properties"]["content"], dict):
        for branch in _branches(schema["properties"]["content"], "string"):
            branch["maxLength"] = settings.max_prompt_chars


def _branches(prop: dict, kind: str) -> list[dict]:
    """The parts of a property's schema that describe a ``kind`` value (the property or its anyOf branches)."""
    found = [prop] if prop.get("type") == kind else []
    return found + [b for b in prop.get("anyOf", []) if isinstance(b, dict) and b.get("type") == kind]
