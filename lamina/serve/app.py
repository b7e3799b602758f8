"""The FastAPI app: OpenAI-compatible routes over a ``Registry`` of served models.

    GET  /v1/models              the served models (GET /v1/models/{model}: one)
    POST /v1/completions         legacy completions: prompt(s) as text or token ids, echo + logprobs
    POST /v1/chat/completions    chat completions with the model's chat template
    POST /v1/embeddings          embedding models (encoders such as minilm); over-long input: 400, or cut
                                 with the extra field truncate=true (truncated_inputs says which)
    POST /v1/retrieve            lamina, with --index: the index's passages for a query; chat completions
                                 with the extra field "rag" are grounded on it (``grounding``)
    GET  /health                 200 while every engine thread runs (503 otherwise)
    GET  /metrics                Prometheus text: requests, tokens in/out, queue depth, batch size, TTFT
    GET  /docs, /openapi.json    the OpenAPI schema
    GET  /                       the chat page (static/: index.html, app.js, style.css; strict CSP)
    GET  /lamina/config          what the page needs first: whether an API key is required, each model's
                                 kind and decoding defaults (its generation.yaml), and the index if any

Requests are checked (``params``) before any work starts; generation runs on each model's engine thread
(``scheduler``); results are shaped by ``outputs``; every error is OpenAI's error object (``errors``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from lamina import __version__
from lamina.errors import InputTooLongError
from lamina.rag.retrieve import RetrieveConfig
from lamina.rag.synthesize import Citation, cite
from lamina.serve import outputs
from lamina.serve.errors import APIError, bad_request, context_length_exceeded, install_handlers
from lamina.serve.grounding import (
    ServedIndex,
    ground,
    grounded_response,
    not_found,
    not_found_stream,
    passages,
    raise_for_rag,
)
from lamina.serve.guards import ApiKeyAuth, BodyLimit, CountRequests
from lamina.serve.params import _n, prepare_chat, prepare_completion
from lamina.serve.registry import Registry
from lamina.serve.scheduler import Job
from lamina.serve.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    RetrieveRequest,
    RetrieveResponse,
    Usage,
)
from lamina.serve.settings import ServeConfig

ROUTES = [
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/retrieve",
    "/health",
    "/metrics",
]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "invalid request (OpenAI error object)"),
        (401, "missing or wrong API key"),
        (404, "unknown model"),
        (429, "queue full (Retry-After)"),
        (500, "server error"),
        (504, "timed out"),
    ]
}
STATIC = Path(__file__).parent / "static"
# the page loads only its own files and talks only to this server: no inline script, no other host
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "seed", "stop")
_SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE chunks with stream=true"}
}


def create_app(registry: Registry, config: ServeConfig | None = None) -> FastAPI:
    """The server app for ``registry``'s models; engine threads start and stop with the app's lifespan.

    With ``config.index`` the index is opened here (its embedding model loaded unless served), so a bad
    path fails before the server starts (``ConfigError``)."""
    config = config or registry.config
    metrics = registry.metrics
    index = ServedIndex.open(config.index, registry) if config.index else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.start()
        try:
            yield
        finally:
            await run_in_threadpool(registry.stop)
            if index is not None:
                index.close()

    app = FastAPI(
        title="lamina",
        version=__version__,
        description="OpenAI-compatible server of lamina models (continuous batching).",
        lifespan=lifespan,
        responses=_ERRORS,
    )
    app.state.registry, app.state.config, app.state.metrics = registry, config, metrics
    app.state.index = index
    install_handlers(app)
    # the last added runs first: count -> auth -> size limit -> routes
    app.add_middleware(BodyLimit, max_bytes=config.max_request_bytes)
    app.add_middleware(ApiKeyAuth, api_keys=config.api_keys)
    app.add_middleware(CountRequests, metrics=metrics, routes=ROUTES)

    @app.get("/v1/models", response_model=ModelList, tags=["openai"])
    async def list_models() -> ModelList:
        """The served models."""
        return ModelList(data=[_card(m) for m in registry.models()])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, tags=["openai"])
    async def get_model(model: str) -> ModelCard:
        """One served model (404 if unknown)."""
        return _card(registry.get(model))

    @app.post("/v1/completions", response_model=CompletionResponse, responses=_SSE, tags=["openai"])
    async def completions(req: CompletionRequest, request: Request) -> Any:
        """OpenAI legacy completions; ``echo`` with ``logprobs`` scores the prompt (lm-evaluation-harness)."""
        served = registry.get(req.model, "generation")
        prepared = await run_in_threadpool(prepare_completion, req, served, config)
        assert served.scheduler is not None
        job = served.scheduler.submit(prepared.prompts, adapter=served.adapter)
        echo = bool(req.echo)
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            gen = outputs.completion_stream(job, prepared, served, echo, req.logprobs, include)
            return _sse(gen)
        await _wait(job, request)
        return outputs.completion_response(job, prepared, served, echo, req.logprobs)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=_SSE, tags=["openai"])
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
        """OpenAI chat completions, rendered with the model's chat template. With lamina's extra field
        ``rag`` (a server started with ``--index``) the last message is answered from the index's passages,
        cited as [1], [2]: the response adds ``sources`` and each choice's ``citations``."""
        served = registry.get(req.model, "generation")
        include = bool(req.stream_options and req.stream_options.include_usage)
        grounding = None
        if req.rag is not None and req.rag is not False:
            grounding = await run_in_threadpool(ground, req, served, index, config)
            if not grounding.shown:  # nothing retrieved: "not found", no model call
                await run_in_threadpool(prepare_chat, req, served, config)  # a bad request is still a 400
                n = _n(req.n, config)
                if req.stream:
                    return _sse(not_found_stream(served.name, n, include))
                return JSONResponse(not_found(served.name, n).model_dump(mode="json"))
            req = grounding.request
        prepared = await run_in_threadpool(prepare_chat, req, served, config)
        assert served.scheduler is not None
        job = served.scheduler.submit(prepared.prompts, adapter=served.adapter)
        logprobs, top = bool(req.logprobs), req.top_logprobs or 0
        if req.stream:
            if grounding is not None:
                shown = grounding.shown
                srcs = [p.model_dump(mode="json") for p in grounding.sources]
                gen = outputs.chat_stream(job, prepared, served, logprobs, top, include, srcs,
                                          lambda text: _citations(text, shown))  # fmt: skip
                return _sse(gen)
            return _sse(outputs.chat_stream(job, prepared, served, logprobs, top, include))
        await _wait(job, request)
        resp = outputs.chat_response(job, prepared, served, logprobs, top)
        if grounding is not None:
            return JSONResponse(grounded_response(resp, grounding).model_dump(mode="json"))
        return resp

    @app.post("/v1/retrieve", response_model=RetrieveResponse, tags=["lamina"])
    async def retrieve(req: RetrieveRequest) -> RetrieveResponse:
        """The passages of the server's index (``--index``) that best answer ``query``, best first: each
        with its document, span (character offsets in the document), page, score and rank (``number``).
        400 without an index, for a ``top_k`` over ``max_retrieve_top_k``, an unknown mode, bad or too many
        filters (``schemas.RagOptions``) or a query over ``schemas.MAX_QUERY_CHARS``."""
        served_index = raise_for_rag(index)
        hits = await run_in_threadpool(served_index.search, req.query, req, config)
        cfg_mode = req.mode or RetrieveConfig.mode
        return RetrieveResponse(
            data=passages(hits), mode=cfg_mode, embedding_model=served_index.store.embedding_model
        )

    @app.post(
        "/v1/embeddings", response_model=EmbeddingResponse, response_model_exclude_none=True, tags=["openai"]
    )
    async def embeddings(req: EmbeddingRequest, response: Response) -> EmbeddingResponse:
        """One vector per input, from an embedding (encoder) model.

        An input over the model's limit answers 400 ``context_length_exceeded`` (as OpenAI does), unless
        the request sets ``truncate``: then it is cut, and ``truncated_inputs`` and the
        ``X-Truncated-Inputs`` header say which and how many.
        """
        served = registry.get(req.model, "embedding")
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts:
            raise bad_request("input must not be an empty list", param="input")
        if not all(isinstance(t, str) for t in texts):
            raise bad_request("token-id input is not supported for embeddings; send strings", param="input")
        if len(texts) > config.max_embedding_inputs:
            raise bad_request(
                f"{len(texts)} inputs; the server allows at most {config.max_embedding_inputs}", param="input"
            )
        try:
            result = await run_in_threadpool(served.embed, [str(t) for t in texts], req.truncate)
        except InputTooLongError as e:
            where = "input" if isinstance(req.input, str) else f"input[{e.index}]"
            raise context_length_exceeded(
                f"This model's maximum context length is {e.limit} tokens, however {where} has "
                f"{e.n_tokens} tokens. Please reduce the length of the input, or send truncate=true to "
                "cut it.",
                param=where,
            ) from None
        vectors = result.vectors
        dim = int(vectors.shape[1])
        if req.dimensions is not None and req.dimensions != dim:
            raise bad_request(
                f"dimensions={req.dimensions}: the model {served.name!r} gives {dim}-dimensional vectors",
                param="dimensions",
            )
        rows = vectors.numpy().astype("<f4")
        data = [
            Embedding(
                index=i,
                embedding=base64.b64encode(row.tobytes()).decode()
                if req.encoding_format == "base64"
                else row.tolist(),
            )
            for i, row in enumerate(np.asarray(rows))
        ]
        total = sum(result.n_tokens)
        if req.truncate:
            response.headers["X-Truncated-Inputs"] = str(len(result.truncated))
        return EmbeddingResponse(
            data=data,
            model=served.name,
            usage=Usage(prompt_tokens=total, total_tokens=total),
            truncated_inputs=list(result.truncated) if req.truncate else None,
        )

    @app.get("/health", response_model=Health, tags=["server"])
    async def health(response: Response) -> Health:
        """Whether every engine thread runs (503 when one does not), with the batch and queue sizes."""
        scheds = [m.scheduler for m in registry.models() if m.scheduler is not None]
        ok = all(s.alive for s in scheds)
        response.status_code = 200 if ok else 503
        return Health(
            status="ok" if ok else "error",
            models=registry.names,
            running=sum(s.engine.num_running for s in scheds),
            queued=sum(s.engine.num_queued for s in scheds),
        )

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The chat page; its URLs are relative, so it also works behind a proxy's path prefix."""
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/lamina/config", tags=["server"])
    async def page_config() -> dict[str, Any]:
        """What the page needs before its first request (open, like /health): whether ``/v1/*`` needs an
        API key, and per model its kind, context window, base model, and decoding defaults from its
        ``generation.yaml`` (OpenAI's names: ``max_tokens`` for ``max_new_tokens``)."""
        return {
            "version": __version__,
            "auth": bool(config.api_keys),
            "index": None if index is None else await run_in_threadpool(index.describe),
            "models": [
                {
                    "id": m.name,
                    "kind": m.kind,
                    "max_model_len": m.context_length,
                    "parent": m.parent,
                    "defaults": {
                        ("max_tokens" if k == "max_new_tokens" else k): getattr(m.lm.generation, k)
                        for k in _DEFAULTS
                    },
                }
                for m in registry.models()
            ],
        }

    @app.get("/metrics", response_class=PlainTextResponse, tags=["server"])
    async def prometheus() -> PlainTextResponse:
        """Prometheus metrics (text exposition format 0.0.4)."""
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _card(m: Any) -> ModelCard:
    return ModelCard(
        id=m.name, created=m.created, kind=m.kind, max_model_len=m.context_length,
        root=m.root or str(m.lm.entry.path), parent=m.parent,
    )  # fmt: skip


def _citations(text: str, shown: list[Citation]) -> dict[str, Any]:
    """What a streamed grounded choice's finishing chunk adds: the numbers its whole text cites."""
    answer = cite(text, shown)
    return {"citations": [c.number for c in answer.citations], "dropped_citations": answer.dropped_citations}


def _sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        gen,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _wait(job: Job, request: Request) -> None:
    """Wait for the job; cancel it if the client disconnects first (its sequences leave the batch)."""
    waiter = asyncio.ensure_future(job.wait())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            waiter.result()  # raises the job's APIError (timeout, engine failure)
            return
        job.cancel()
        raise APIError(499, "The client closed the request", code="client_closed_request")
    finally:
        watcher.cancel()
        if not waiter.done():
            waiter.cancel()
            job.cancel()


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body has been read, so only a disconnect can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
