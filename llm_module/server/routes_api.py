"""The plain HTTP API: probes, generation (also streamed as server-sent events), adapters, jobs."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from llm_module import llm
from llm_module.errors import LLMError
from llm_module.server.errors import error_body
from llm_module.server.models import EvaluateBody, GenerateBody, LoadAdapterBody, TrainBody
from llm_module.server.routes_actions import run_action


def _call(app: FastAPI, action: str, **kwargs: Any):
    """Run a jaseci action with the same readiness wait and guards as the protocol routes."""
    return run_in_threadpool(run_action, app, action, llm.ACTIONS[action], kwargs)


def build_router(app: FastAPI) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/docs")  # as jaseci's serv_actions does

    @router.get("/healthz", tags=["probes"], summary="The process is up (no model needed)")
    async def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/readyz", tags=["probes"], summary="200 once the model is loaded, else 503")
    async def readyz() -> JSONResponse:
        status = app.state.startup.status()
        if status["ready"]:
            return JSONResponse({**status, "model": app.state.engine.describe().get("model")})
        message = status["error"] or ("The model is loading." if status["startup"] == "loading"
                                      else "No model is loaded; call setup.")
        return JSONResponse({**error_body(503, message, "not_ready"), "startup": status["startup"]}, status_code=503)

    @router.get("/v1/model", tags=["model"], summary="What is loaded (does not load anything)")
    async def model() -> dict:
        return app.state.engine.describe()

    @router.post("/v1/generate", tags=["generation"], summary="Generate text (batched with concurrent calls)")
    async def generate(body: GenerateBody) -> dict:
        started = time.perf_counter()
        options = body.options()
        results = await _call(app, "generate", **options)
        return {"results": results, "seconds": round(time.perf_counter() - started, 4)}

    @router.post("/v1/generate/stream", tags=["generation"],
                 summary="Generate one completion as server-sent events",
                 description="Events: `data: {\"text\": piece}` per piece, then `event: done` with the whole "
                             "text, or `event: error` with an error object. Errors found before the first piece "
                             "come back as a JSON error response instead.")
    async def generate_stream(body: GenerateBody) -> StreamingResponse:
        pieces = await run_in_threadpool(_start_stream, app, body.options())
        return StreamingResponse(_sse(pieces), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/v1/adapters", tags=["adapters"], summary="Loaded adapters")
    async def list_adapters() -> list:
        return app.state.engine.list_adapters()

    @router.post("/v1/adapters", tags=["adapters"], summary="Load an adapter")
    async def load_adapter(body: LoadAdapterBody) -> dict:
        return await _call(app, "load_adapter", **body.dict())

    @router.delete("/v1/adapters/{name}", tags=["adapters"], summary="Unload an adapter")
    async def unload_adapter(name: str) -> dict:
        return await _call(app, "unload_adapter", name=name)

    @router.put("/v1/adapters/default", tags=["adapters"], summary="Set (or with null, clear) the default adapter")
    async def set_default_adapter(body: dict[str, str | None]) -> dict:
        return await _call(app, "set_default_adapter", name=body.get("name"))

    @router.post("/v1/evaluate", tags=["training"], summary="Loss and perplexity on a data file")
    async def evaluate(body: EvaluateBody) -> dict:
        return await _call(app, "evaluate", **body.dict())

    @router.post("/v1/jobs/train", tags=["jobs"], status_code=202, summary="Start LoRA training in the background")
    async def start_training(body: TrainBody) -> dict:
        return await _call(app, "train", **body.dict(), background=True)

    @router.get("/v1/jobs", tags=["jobs"], summary="All jobs, oldest first")
    async def list_jobs() -> list:
        return app.state.engine.list_jobs()

    @router.get("/v1/jobs/{job_id}", tags=["jobs"], summary="A job's state, progress and result")
    async def job_status(job_id: str) -> dict:
        return app.state.engine.job_status(job_id)

    @router.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], summary="Ask a running job to stop")
    async def cancel_job(job_id: str) -> dict:
        return app.state.engine.cancel_job(job_id)

    @router.get("/v1/settings", tags=["model"], summary="The service settings (token masked)")
    async def settings() -> dict:
        return app.state.settings.public_dict()

    return router


def _start_stream(app: FastAPI, options: dict) -> Iterator[str]:
    """Validate and produce the first piece here, so request errors answer as JSON, not mid-stream."""
    from llm_module.server import guards

    settings = app.state.settings
    app.state.startup.wait(settings.ready_timeout_s)
    app.state.startup.require_loaded()
    prompt = options.pop("prompt", None)
    stream = app.state.engine.stream(prompt, **guards.check_generation(options, settings))
    try:
        first = next(stream)
    except StopIteration:
        return iter(())
    return _chain(first, stream)


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


async def _sse(pieces: Iterator[str]) -> AsyncIterator[str]:
    text = ""
    try:
        async for piece in iterate_in_threadpool(pieces):
            if not piece:  # the streamer yields "" while it waits for a word boundary
                continue
            text += piece
            yield f"data: {json.dumps({'text': piece})}\n\n"
    except LLMError as exc:
        yield f"event: error\ndata: {json.dumps(exc.to_dict())}\n\n"
        return
    except Exception as exc:  # the status line is sent already: report in-band
        yield f"event: error\ndata: {json.dumps(error_body(500, f'{type(exc).__name__}: {exc}', 'internal_error'))}\n\n"
        return
    yield f"event: done\ndata: {json.dumps({'text': text})}\n\n"
