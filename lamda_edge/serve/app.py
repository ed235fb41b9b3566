"""The HTTP API (FastAPI): OpenAI's chat, completions and models endpoints, /v1/classify and /health.

    POST body ──> API key ──> size cap ──> parse + check (requests.py) ──> tokenize ──> Admission (slot, queue,
    deadline) ──> worker thread: Engine.run ──> JSON, or server-sent events (OpenAI's chunk schema) as tokens come

Every refusal is OpenAI's error object with a 4xx/5xx status, and the server goes on serving. A client that leaves
mid-request cancels its job (checked after each token) and its slot frees when the worker thread has stopped.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lamda_edge.serve.admission import Admission
from lamda_edge.serve.engine import Cancelled, Engine, Job, Outcome
from lamda_edge.serve.requests import (
    ApiError,
    GenerationRequest,
    check_lengths,
    parse_chat,
    parse_classify,
    parse_completion,
    parse_json,
)

log = logging.getLogger("lamda_edge.serve")
DISCONNECT_POLL_S = 0.25  # how often a non-streamed request checks that its client is still there


@dataclass(frozen=True)
class ServeSettings:
    """What a server enforces: its model's name, the API key, slots and queue, deadline, body cap."""

    model_name: str
    api_key: str | None = None
    concurrency: int = 1
    queue: int = 16
    timeout_s: float = 120.0
    max_body_bytes: int = 1 << 20
    retry_after_s: int = 1


class Service:
    """The state behind the routes: the engine, admission, the worker threads and counters."""

    def __init__(self, engine: Engine, settings: ServeSettings):
        self.engine, self.settings = engine, settings
        self.admission = Admission(settings.concurrency, settings.queue, settings.retry_after_s)
        self.executor = ThreadPoolExecutor(settings.concurrency, thread_name_prefix="lamda-serve")
        self.jobs: set[Job] = set()
        self.counts = {"completed": 0, "cancelled": 0, "timed_out": 0, "rejected": 0}
        self.created = int(engine.folder.stat().st_mtime)

    def drain(self) -> None:
        """Stop taking new requests (503); the ones already admitted go on."""
        self.admission.draining = True

    def cancel_all(self) -> None:
        for job in list(self.jobs):
            job.cancel.set()

    def check_key(self, request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key. Fix: send the header `Authorization: Bearer KEY` with the "
                           "server's --api-key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.settings.model_name:
            raise ApiError(404, f"the model {model!r} does not exist here; this server runs "
                           f"{self.settings.model_name!r}. Fix: see GET /v1/models", param="model",
                           code="model_not_found")

    async def body(self, request) -> dict:
        """The JSON body, read up to the cap (413 past it)."""
        cap = self.settings.max_body_bytes
        length = request.headers.get("content-length", "")
        size, chunks = int(length) if length.isdigit() else 0, []
        if size <= cap:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > cap:
                    break
                chunks.append(chunk)
        if size > cap:
            raise ApiError(413, f"the request body is over the server's cap of {cap} bytes. Fix: send a shorter "
                           "prompt, or start the server with a larger --max-body-bytes", code="body_too_large")
        return parse_json(b"".join(chunks))

    async def admit(self, job: Job, loop_deadline: float):
        """Take a slot, then start `job` in a worker thread; the slot frees when the thread is done."""
        try:
            await self.admission.enter(loop_deadline)
        except ApiError as exc:
            kind = {429: "rejected", 504: "timed_out"}.get(exc.status)
            if kind:
                self.counts[kind] += 1
            raise
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, self.engine.run, job)
        except BaseException:
            self.admission.release()
            raise
        self.jobs.add(job)
        future.add_done_callback(lambda f: self._finished(job, f))
        return future

    def _finished(self, job: Job, future) -> None:
        self.admission.release()
        self.jobs.discard(job)
        error = future.exception()  # read here, so that an unread one is never logged as lost
        kind = "completed" if error is None else "cancelled" if isinstance(error, Cancelled) else \
            "timed_out" if isinstance(error, ApiError) and error.status == 504 else None
        if kind:
            self.counts[kind] += 1

    def health(self) -> dict:
        return {"status": "draining" if self.admission.draining else "ok", "model": self.settings.model_name,
                "kind": self.engine.kind, "graph": self.engine.onnx_file, "running": self.admission.running,
                "queued": self.admission.waiting, **self.counts}


def create_app(engine: Engine, settings: ServeSettings):
    """The FastAPI application serving `engine` under `settings`."""
    service = Service(engine, settings)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.drain()
        service.cancel_all()  # what outlived the grace period stops after its token in progress
        service.executor.shutdown(wait=True)

    app = FastAPI(title="lamda-edge serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):  # unknown paths and methods, in OpenAI's shape too
        code = "not_found" if exc.status_code == 404 else None
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}. Fix: see the "
                         "endpoints in `lamda-edge serve --help`", code=code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.get("/health")
    async def health():
        status = service.health()
        return JSONResponse(status, status_code=503 if status["status"] == "draining" else 200)

    @app.get("/v1/models")
    async def models(request: Request):
        service.check_key(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model",
                                            "created": service.created, "owned_by": "lamda-edge"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, chat=False)

    @app.post("/v1/classify")
    async def classify(request: Request):
        service.check_key(request)
        req = parse_classify(await service.body(request))
        service.check_model(req.model)
        loop = asyncio.get_running_loop()
        await service.admission.enter(loop.time() + settings.timeout_s)
        try:
            predictions, tokens = await loop.run_in_executor(service.executor, engine.classify, req.texts, req.pairs)
        finally:
            service.admission.release()
        return {"object": "list", "model": settings.model_name,
                "data": [{"index": i, "label": p.label, "label_id": p.label_id, "probability": p.probability,
                          "probabilities": p.probabilities} for i, p in enumerate(predictions)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    async def _generate(request, chat: bool):
        service.check_key(request)
        body = await service.body(request)
        req = parse_chat(body) if chat else parse_completion(body)
        service.check_model(req.model)
        ids = engine.encode_chat(req.messages) if chat else engine.encode_text(req.prompt)
        temperature = engine.default_temperature if req.temperature is None else req.temperature
        engine.check_sampling(temperature)
        budget = check_lengths(len(ids), req.max_tokens, engine.context)
        loop = asyncio.get_running_loop()
        job = Job(ids, budget, temperature, req.top_p, req.seed, req.stop, req.ignore_eos,
                  deadline=time.monotonic() + settings.timeout_s)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()),
                "model": settings.model_name}
        if req.stream:
            pieces: asyncio.Queue = asyncio.Queue()
            job.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
            future = await service.admit(job, loop.time() + settings.timeout_s)
            future.add_done_callback(lambda _: pieces.put_nowait(None))
            return StreamingResponse(_events(job, future, pieces, req, meta, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        future = await service.admit(job, loop.time() + settings.timeout_s)
        outcome = await _result(request, job, future)
        return _completion(meta, outcome, chat)

    async def _result(request, job: Job, future) -> Outcome:
        """The job's outcome; a client that leaves (checked every DISCONNECT_POLL_S) cancels it."""
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
                if done:
                    try:
                        return future.result()
                    except Cancelled:
                        raise ApiError(503, "the request was cancelled: the server is shutting down",
                                       type="server_error", code="cancelled") from None
                if await request.is_disconnected():
                    job.cancel.set()
                    raise ApiError(499, "the client closed the request", code="client_closed_request")
        except asyncio.CancelledError:
            job.cancel.set()
            raise

    async def _events(job: Job, future, pieces: asyncio.Queue, req: GenerationRequest, meta: dict, chat: bool):
        """Server-sent events: a chunk per piece of text, the finish chunk, usage if asked, then [DONE]."""
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None = None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({**meta, "object": kind, "choices": [choice]})

        try:
            if chat:
                yield chunk(None, first=True)
            while (piece := await pieces.get()) is not None:
                yield chunk(piece)
            try:
                outcome = future.result()
            except (ApiError, Cancelled) as exc:
                error = exc if isinstance(exc, ApiError) else ApiError(503, "cancelled: the server is shutting down",
                                                                        type="server_error", code="cancelled")
                yield _sse(error.body())
                return
            yield chunk(None, finish=outcome.finish_reason)
            if req.include_usage:
                yield _sse({**meta, "object": kind, "choices": [], "usage": _usage(outcome)})
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # a client that left mid-stream ends here (GeneratorExit / CancelledError)

    return app


def _completion(meta: dict, outcome: Outcome, chat: bool) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text}, "logprobs": None,
                  "finish_reason": outcome.finish_reason}
    else:
        choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": outcome.finish_reason}
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": _usage(outcome)}


def _usage(outcome: Outcome) -> dict:
    return {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
