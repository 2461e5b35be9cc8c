"""The plain HTTP API: probes, generation (also streamed as server-sent events), adapters, jobs.

Thin routes: a typed body in (schemas.py), the app's engine called in the thread pool, its answer out.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Path
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from llm_module.errors import LLMError
from llm_module.server.errors import documented, error_body
from llm_module.server.routes_actions import run_action
from llm_module.server.schemas import (
    DefaultAdapterBody,
    EvaluateBody,
    ExportBody,
    GenerateBody,
    LoadAdapterBody,
    NotReadyBody,
    StreamBody,
    TrainBody,
)

# An adapter's name in a path: what check_name allows, except "default", which is PUT /v1/adapters/default's path
# (OpenAPI matches a fixed path before a templated one; so does this server).
ADAPTER_IN_PATH = r"(?!default$)[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
JOB_ID = Path(..., min_length=1, description="A job's id (GET /v1/jobs lists them).")
# One server-sent event (OpenAPI before 3.2 describes an event stream by its events).
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "event": {"enum": ["message", "done", "error"], "description": "message (the default) for a piece of text."},
    "data": {"type": "string", "description": "JSON: {\"text\": ...}, or with event error an error body."}}}
SSE = {200: {"content": {"text/event-stream": {"schema": SSE_EVENT}},
             "description": "Server-sent events (see the description)."}}


class AdapterNameConvertor(Convertor):
    regex = ADAPTER_IN_PATH

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("adapter_name", AdapterNameConvertor())


def _call(app: FastAPI, action: str, **kwargs: Any):
    """Run an action with the same readiness wait and checks as the protocol routes."""
    return run_in_threadpool(run_action, app, action, kwargs)


def build_router(app: FastAPI) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz", tags=["probes"], summary="The process is up (no model needed)")
    async def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/readyz", tags=["probes"], summary="200 once the model is loaded, else 503",
                responses={503: {"model": NotReadyBody, "description": "No model is loaded (yet)."}})
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

    @router.post("/v1/generate", tags=["generation"], summary="Generate text (batched with concurrent calls)",
                 responses=documented(400, 404, 409, 413, 503))
    async def generate(body: GenerateBody) -> dict:
        started = time.perf_counter()
        options = body.options()
        results = await _call(app, "generate", **options)
        return {"results": results, "seconds": round(time.perf_counter() - started, 4)}

    @router.post("/v1/generate/stream", tags=["generation"],
                 summary="Generate one completion as server-sent events",
                 description="Events: `data: {\"text\": piece}` per piece, then `event: done` with the whole "
                             "text, or `event: error` with an error object. Errors found before the first piece "
                             "come back as a JSON error response instead.",
                 response_class=StreamingResponse, responses={**SSE, **documented(400, 404, 409, 413, 503)})
    async def generate_stream(body: StreamBody) -> StreamingResponse:
        pieces = await run_in_threadpool(_start_stream, app, body.options())
        return StreamingResponse(_sse(pieces), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @router.get("/v1/adapters", tags=["adapters"], summary="Loaded adapters")
    async def list_adapters() -> list:
        return app.state.engine.list_adapters()

    @router.post("/v1/adapters", tags=["adapters"], summary="Load an adapter",
                 responses=documented(400, 403, 404, 409, 503))
    async def load_adapter(body: LoadAdapterBody) -> dict:
        return await _call(app, "load_adapter", **body.dict(exclude_none=True))

    @router.delete("/v1/adapters/{name:adapter_name}", tags=["adapters"], summary="Unload an adapter",
                   responses=documented(404, 409, 503))
    async def unload_adapter(name: str = Path(..., regex=f"^{ADAPTER_IN_PATH}$",
                                              description="A loaded adapter's name.")) -> dict:
        return await _call(app, "unload_adapter", name=name)

    @router.put("/v1/adapters/default", tags=["adapters"], summary="Set (or with null, clear) the default adapter",
                responses=documented(404, 503))
    async def set_default_adapter(body: DefaultAdapterBody) -> dict:
        return await _call(app, "set_default_adapter", name=body.name)

    @router.post("/v1/evaluate", tags=["training"], summary="Loss and perplexity on a data file",
                 responses=documented(400, 403, 404, 409, 503))
    async def evaluate(body: EvaluateBody) -> dict:
        return await _call(app, "evaluate", **body.options())

    @router.post("/v1/export", tags=["training"], summary="Merge an adapter and write it as hf, gguf or lora-gguf",
                 responses=documented(400, 403, 404, 409, 503))
    async def export(body: ExportBody) -> dict:
        return await _call(app, "export", **body.options())

    @router.post("/v1/jobs/train", tags=["jobs"], status_code=202, summary="Start LoRA training in the background",
                 responses=documented(400, 403, 404, 409, 503))
    async def start_training(body: TrainBody) -> dict:
        return await _call(app, "train", **body.options(), background=True)

    @router.get("/v1/jobs", tags=["jobs"], summary="All jobs, oldest first")
    async def list_jobs() -> list:
        return app.state.engine.list_jobs()

    @router.get("/v1/jobs/{job_id}", tags=["jobs"], summary="A job's state, progress and result",
                responses=documented(404))
    async def job_status(job_id: str = JOB_ID) -> dict:
        return app.state.engine.job_status(job_id)

    @router.post("/v1/jobs/{job_id}/resume", tags=["jobs"], status_code=202,
                 summary="Run an interrupted, failed or cancelled training job again, from its last checkpoint",
                 responses=documented(400, 403, 404, 409, 503))
    async def resume_job(job_id: str = JOB_ID) -> dict:
        return await run_in_threadpool(_when_ready, app, lambda: app.state.engine.resume_job(job_id))

    @router.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], summary="Ask a running job to stop",
                 responses=documented(404, 409))
    async def cancel_job(job_id: str = JOB_ID) -> dict:
        return app.state.engine.cancel_job(job_id)

    @router.get("/v1/settings", tags=["model"], summary="The service settings (token masked)")
    async def settings() -> dict:
        return app.state.settings.public_dict()

    return router


def _when_ready(app: FastAPI, work):
    """``work()`` once the start-up load is over and a model is loaded."""
    app.state.startup.wait(app.state.settings.ready_timeout_s)
    app.state.startup.require_loaded()
    return work()


def _start_stream(app: FastAPI, options: dict) -> Iterator[str]:
    """Validate and queue here, so request errors (and a full queue) answer as JSON, not mid-stream."""
    settings = app.state.settings
    app.state.startup.wait(settings.ready_timeout_s)
    app.state.startup.require_loaded()
    return app.state.engine.stream(options.pop("prompt", None), **options)


async def _sse(pieces) -> AsyncIterator[str]:
    """Server-sent events of a text stream; a client that goes away cancels its row (``close``)."""
    text = ""
    try:
        async for piece in iterate_in_threadpool(pieces):
            text += piece
            yield f"data: {json.dumps({'text': piece})}\n\n"
    except LLMError as exc:
        yield f"event: error\ndata: {json.dumps(exc.to_dict())}\n\n"
        return
    except Exception as exc:  # the status line is sent already: report in-band
        yield f"event: error\ndata: {json.dumps(error_body(500, f'{type(exc).__name__}: {exc}', 'internal_error'))}\n\n"
        return
    finally:
        pieces.close()
    yield f"event: done\ndata: {json.dumps({'text': text})}\n\n"
