"""``create_app(settings, engine=None)``: the FastAPI app of ``llm-module serve``.

Every route reaches the engine it was given (``app.state.engine``); nothing here imports jaseci.
"""

from __future__ import annotations

import logging

import anyio.to_thread
from fastapi import FastAPI

from llm_module import __version__
from llm_module.engine import Engine
from llm_module.server import routes_actions, routes_api, routes_scale, routes_ui
from llm_module.server.errors import install_error_handlers
from llm_module.server.lifecycle import StartupLoad
from llm_module.server.openai import routes as routes_openai
from llm_module.server.openapi import install_openapi
from llm_module.server.security import BodyLimitMiddleware, TokenMiddleware
from llm_module.settings import Settings

log = logging.getLogger(__name__)

DESCRIPTION = """\
Run, fine-tune (LoRA) and serve a language model for Jac programs.

* **jaseci actions**: `actions load remote http://HOST:PORT` (with a token: `http://HOST:PORT/t/<token>`),
  then call `llm.generate(...)` and the other actions from walkers. An action that fails answers
  `{"error": {"type", "message", "status"}}`, which the walker receives as the action's result.
* **HTTP API** under `/v1`: generation (also as server-sent events), adapters, background training jobs.
* **OpenAI API**: `/v1/chat/completions`, `/v1/completions`, `/v1/models` (the `openai` client, LiteLLM,
  Jac 2 programs through byLLM); `model` names the base model or a LoRA adapter.
* **Auth**: when a token is set, send `Authorization: Bearer <token>` or prefix paths with `/t/<token>`.
"""


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """The service over ``engine`` (built from ``settings`` when not given)."""
    settings = settings or Settings()
    engine = engine or Engine(settings)
    app = FastAPI(title="llm_module", version=__version__, description=DESCRIPTION)
    app.state.settings, app.state.engine = settings, engine
    app.state.startup = StartupLoad(engine, settings)
    install_error_handlers(app)
    app.include_router(routes_ui.build_router(app))  # first: its GET / opens the playground, not /docs
    app.include_router(routes_api.build_router(app))
    app.include_router(routes_openai.build_router(app))  # OpenAI clients, LiteLLM, Jac 2's byLLM
    app.include_router(routes_actions.build_router(app))
    app.include_router(routes_scale.build_router(app))  # --adapters-dir: shared adapters of scaled-out replicas
    # Added last runs first: the token is checked before any body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(TokenMiddleware, token=settings.token)
    install_openapi(app)  # the schema made exact: error bodies, caps, auth (openapi.py)

    @app.on_event("startup")
    async def start() -> None:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.threads
        app.state.startup.start()
        log.info("llm_module serving with %s", settings.public_dict())

    @app.on_event("shutdown")
    async def stop() -> None:
        engine.close()

    return app
