"""The OpenAI-compatible API: chat completions, completions, models, and vLLM's adapter routes.

Thin routes over the app's engine: the body is validated by its schema (schemas.py), translated
into a generate call of the serving core (translate.py), which batches it with every other
request, and the outputs are translated back. ``model`` picks the adapter: an adapter's name, or
the base model's name (or ``base``); a folder of the ``adapters_dir`` setting loads on first use.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, FastAPI
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from llm_module.errors import LLMError
from llm_module.server.errors import documented, error_body

from .schemas import ChatCompletionRequest, CompletionRequest, LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from .translate import Reply, chat_kwargs, completion_kwargs, in_openai_terms

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# A JSON object, or with stream=true server-sent events (data: <chunk>, then data: [DONE]).
JSON_OR_SSE = {200: {"content": {"application/json": {"schema": {"type": "object"}},
                                 "text/event-stream": {"schema": {  # one event: data is a chunk or [DONE]
                                     "type": "object", "required": ["data"],
                                     "properties": {"data": {"type": "string"}}}}},
                     "description": "The completion (stream=false), or its chunks as server-sent events."}}
GENERATION_ERRORS = documented(400, 404, 409, 413, 503)


def build_router(app: FastAPI) -> APIRouter:
    router = APIRouter(tags=["OpenAI API"])

    def engine():
        settings, startup = app.state.settings, app.state.startup
        startup.wait(settings.ready_timeout_s)
        startup.require_loaded()
        return app.state.engine

    def start(body, kwargs_of) -> tuple:
        """(reply, handle, call) for a request: model resolved, call validated, rows queued."""
        eng = engine()
        adapter = eng.adapter_for_model(body.model)
        kwargs = kwargs_of(body, eng.serving.limits.max_new_tokens or eng.host.context_length())
        try:
            call, handle = eng.start(adapter=adapter, stream=body.stream, **kwargs)
        except LLMError as exc:
            raise in_openai_terms(exc) from None
        return Reply("chat" if isinstance(body, ChatCompletionRequest) else "text", body.model,
                     eng.host.tokenizer), handle, call

    @router.get("/v1/models", summary="The base model and the loaded adapters", responses=documented(503))
    async def models() -> dict:
        return {"object": "list", "data": await run_in_threadpool(lambda: engine().model_cards())}

    @router.post("/v1/chat/completions", summary="OpenAI chat completions (streamed with stream=true)",
                 responses={**JSON_OR_SSE, **GENERATION_ERRORS})
    async def chat_completions(body: ChatCompletionRequest):
        reply, handle, call = await run_in_threadpool(start, body, chat_kwargs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = reply.chunks(handle.events(), handle, call.request.size, include_usage)
            return StreamingResponse(_sse(chunks, handle), media_type="text/event-stream", headers=SSE_HEADERS)
        return reply.chat(await run_in_threadpool(handle.result))

    @router.post("/v1/completions", summary="OpenAI completions (streamed with stream=true)",
                 responses={**JSON_OR_SSE, **GENERATION_ERRORS})
    async def completions(body: CompletionRequest):
        reply, handle, call = await run_in_threadpool(start, body, completion_kwargs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            chunks = reply.chunks(handle.events(), handle, call.request.size, include_usage, call.texts, body.echo)
            return StreamingResponse(_sse(chunks, handle), media_type="text/event-stream", headers=SSE_HEADERS)
        return reply.completion(await run_in_threadpool(handle.result), call.texts, call.request.num_sequences,
                                body.echo)

    @router.post("/v1/load_lora_adapter", summary="vLLM's: load a LoRA adapter under a name",
                 responses=documented(400, 403, 404, 409, 503))
    async def load_lora_adapter(body: LoadLoraAdapterRequest) -> dict:
        info = await run_in_threadpool(lambda: engine().load_adapter(body.lora_path, body.lora_name))
        return {"object": "lora_adapter", "id": info["name"], "path": info["path"],
                "message": f"Success: LoRA adapter '{info['name']}' added successfully."}

    @router.post("/v1/unload_lora_adapter", summary="vLLM's: unload a LoRA adapter",
                 responses=documented(400, 404, 409, 503))
    async def unload_lora_adapter(body: UnloadLoraAdapterRequest) -> dict:
        await run_in_threadpool(lambda: engine().unload_adapter(body.lora_name))
        return {"object": "lora_adapter", "id": body.lora_name, "deleted": True,
                "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}

    return router


async def _sse(chunks: Iterator[dict], handle) -> AsyncIterator[str]:
    """OpenAI's server-sent events: one ``data:`` line per chunk, then ``data: [DONE]``; a client that
    goes away cancels the request's rows."""
    try:
        async for chunk in iterate_in_threadpool(chunks):
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except LLMError as exc:  # the status line is sent already: report in-band, as OpenAI does
        yield f"data: {json.dumps(exc.to_dict())}\n\n"
    except Exception as exc:
        yield f"data: {json.dumps(error_body(500, f'{type(exc).__name__}: {exc}', 'internal_error'))}\n\n"
    finally:
        handle.cancel()
    yield "data: [DONE]\n\n"

