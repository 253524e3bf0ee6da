"""The OpenAI-compatible HTTP API over an Engine (FastAPI; run it with uvicorn, as serve.py does).

    GET  /                       the playground (one static page; its API calls carry the key typed into it)
    GET  /health                 liveness and load (no key needed)
    GET  /v1/models              the served model
    POST /v1/completions         text completion (stream or not)
    POST /v1/chat/completions    chat completion (stream or not)
    GET  /v1/sessions/{id}       a session's token count and state size
    DELETE /v1/sessions/{id}     forget a session

Responses add `state_bytes` (the size of the conversation's model state), `state_saved` (false when a state
the request keeps could not be computed or written to disk) and, with a session, `session_id` to OpenAI's
fields; streams carry them in the usage chunk (stream_options.include_usage).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..models.streaming import SamplingParams
from .engine import Engine, GenerationRequest
from .protocol import APIError, ChatRequest, CompletionRequest, validation_error
from .states import SessionBusy, StateStore, TooManySessions, check_session_id
from .text import ChatFormat, encode


def create_app(engine: Engine, store: StateStore, tokenizer, model_name: str, *, api_key: str | None = None,
               max_prompt_tokens: int = 32768, default_max_tokens: int = 256, manage_engine: bool = True) -> FastAPI:
    """The FastAPI app. manage_engine: start the engine with the app and stop it (and flush the store) after."""

    @asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            if manage_engine:
                engine.stop()
                store.close()

    app = FastAPI(title="SpikeLM server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    chat = ChatFormat(tokenizer)
    created = int(time.time())
    eos = engine.eos_ids
    vocab = engine.model.config.vocab_size
    playground = resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8")

    # -- errors in OpenAI's shape -------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail), None, code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request, e):
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
                           None, "invalid_api_key")

    async def body_of(request: Request, model_cls):
        raw = await request.body()
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object", None, "invalid_json")
        try:
            req = model_cls.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model != model_name:
            raise APIError(404, f"the model '{req.model}' does not exist: this server serves '{model_name}'",
                           "model", "model_not_found")
        req.refuse_unsupported()
        return req

    # -- pages and metadata ---------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(playground)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "engine": engine.stats(), "states": store.stats()}

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "spikelm"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str, request: Request):
        authorize(request)
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist", "model", "model_not_found")
        return model_card()

    def session_id_of(sid: str) -> str:
        try:
            return check_session_id(sid)
        except ValueError as e:
            raise APIError(400, str(e), "session_id", "invalid_value") from None

    @app.get("/v1/sessions/{sid}")
    async def get_session(sid: str, request: Request):
        authorize(request)
        info = store.session_info(session_id_of(sid))
        if info is None:
            raise APIError(404, f"no session '{sid}'", "session_id", "session_not_found")
        return info

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str, request: Request):
        authorize(request)
        try:
            gone = store.delete_session(session_id_of(sid))
        except SessionBusy as e:
            raise APIError(409, str(e), "session_id", "session_busy") from None
        if not gone:
            raise APIError(404, f"no session '{sid}'", "session_id", "session_not_found")
        return {"id": sid, "object": "session", "deleted": True}

    # -- generation -------------------------------------------------------------------------------------
    def sampling(req) -> SamplingParams:
        try:
            return SamplingParams(temperature=1.0 if req.temperature is None else req.temperature, top_k=req.top_k,
                                  top_p=1.0 if req.top_p is None else req.top_p,
                                  repetition_penalty=req.repetition_penalty)
        except ValueError as e:
            raise APIError(400, str(e), None, "invalid_value") from None

    def check_length(ids: list[int], param: str) -> None:
        if len(ids) > max_prompt_tokens:
            raise APIError(400, f"the prompt is {len(ids)} tokens, more than this server's maximum of "
                           f"{max_prompt_tokens} (--max_prompt_tokens)", param, "context_length_exceeded")

    def completion_request(req: CompletionRequest) -> GenerationRequest:
        prompt = req.single_prompt()
        if isinstance(prompt, str):
            ids = encode(tokenizer, prompt)
            end_ids = (lambda text: encode(tokenizer, prompt + text))
        else:
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(400, f"prompt holds token id {bad}, outside the vocabulary [0, {vocab})", "prompt",
                               "invalid_value")
            ids = list(prompt)
            end_ids = (lambda text: ids + encode(tokenizer, text))
        check_length(ids, "prompt")
        return GenerationRequest(ids, req.max_tokens or default_max_tokens, boundaries=[(len(ids), False)],
                                 end_ids=end_ids)

    def chat_request(req: ChatRequest) -> GenerationRequest:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            prompt = chat.prompt(messages, add_generation_prompt=True)
        except Exception as e:  # noqa: BLE001  (the template refused the conversation)
            raise APIError(400, f"the chat template cannot render these messages: {e}", "messages",
                           "invalid_value") from None
        check_length(prompt.ids, "messages")
        boundaries = [(prompt.boundaries[-1], False)] if prompt.boundaries else []
        if prompt.system_end and (not prompt.boundaries or prompt.system_end != prompt.boundaries[-1]):
            boundaries.append((prompt.system_end, True))

        def end_ids(text: str) -> list[int]:
            return chat.prompt(messages + [{"role": "assistant", "content": text}], add_generation_prompt=False).ids

        return GenerationRequest(prompt.ids, req.max_tokens or req.max_completion_tokens or default_max_tokens,
                                 boundaries=boundaries, end_ids=end_ids)

    async def generate(request: Request, model_cls, build, kind: str):
        authorize(request)
        req = await body_of(request, model_cls)
        params = sampling(req)
        gen = await run_in_threadpool(build, req)
        gen.params, gen.seed, gen.stop, gen.ignore_eos = params, req.seed, req.stop_list(), req.ignore_eos
        if req.session_id is not None:
            gen.session_id = req.session_id
            gen.boundaries, gen.end_ids = [], None
            try:
                seen = store.acquire_session(req.session_id)
            except SessionBusy as e:
                raise APIError(409, str(e), "session_id", "session_busy") from None
            except TooManySessions as e:
                raise APIError(429, str(e), "session_id", "too_many_sessions") from None
            if not gen.prompt_ids and not seen:
                if not eos:
                    store.release_session(req.session_id)
                    raise APIError(400, "the prompt is empty", "prompt", "invalid_value")
                gen.prompt_ids = [min(eos)]
        elif not gen.prompt_ids:
            if not eos:
                raise APIError(400, "the prompt is empty", "prompt", "invalid_value")
            gen.prompt_ids = [min(eos)]  # generate from the start of a document
            gen.boundaries = []
        channel = engine.submit(gen, asyncio.get_running_loop())
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        shape = _Shape(kind, rid, model_name, req.session_id)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(engine, gen, channel, shape, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(engine, gen, channel, shape, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, CompletionRequest, completion_request, "text")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, ChatRequest, chat_request, "chat")

    return app


class _Shape:
    """OpenAI's response objects for one request."""

    def __init__(self, kind: str, rid: str, model: str, session_id: str | None):
        self.kind, self.rid, self.model, self.session_id = kind, rid, model, session_id
        self.created = int(time.time())

    def _base(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model}

    def choice_delta(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        return {**self._base("text_completion"), "choices": [choice]}

    @staticmethod
    def usage(info: dict) -> dict:
        return {"prompt_tokens": info["prompt_tokens"], "completion_tokens": info["completion_tokens"],
                "total_tokens": info["prompt_tokens"] + info["completion_tokens"],
                "prompt_tokens_details": {"cached_tokens": info["cached_tokens"]}}

    def extras(self, info: dict) -> dict:
        out = {"state_bytes": info["state_bytes"], "state_saved": info["state_saved"]}
        if self.session_id is not None:
            out["session_id"] = self.session_id
        return out

    def usage_chunk(self, info: dict) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._base(obj), "choices": [], "usage": self.usage(info), **self.extras(info)}

    def final(self, text: str, info: dict) -> dict:
        reason = info["finish_reason"]
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        return {**self._base(obj), "choices": [choice], "usage": self.usage(info), **self.extras(info)}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(engine: Engine, gen: GenerationRequest, channel, shape: _Shape, include_usage: bool):
    complete = False
    try:
        if shape.kind == "chat":
            yield _sse(shape.choice_delta(None, None, role=True))
        while True:
            text, events = await channel.get()
            if text:
                yield _sse(shape.choice_delta(text, None))
            for event in events:
                if event[0] == "finish":
                    yield _sse(shape.choice_delta(None, event[1]))
                elif event[0] == "done":
                    if include_usage:
                        yield _sse(shape.usage_chunk(event[1]))
                    complete = True
                    yield "data: [DONE]\n\n"
                    return
                elif event[0] == "error":
                    complete = True
                    status, message = event[1]
                    yield _sse(APIError(status, message).body())
                    return
    finally:
        if not complete:
            engine.cancel(gen)  # the client went away: free its slot now


async def _collect(engine: Engine, gen: GenerationRequest, channel, shape: _Shape, request: Request):
    parts = []
    try:
        while True:
            try:
                text, events = await asyncio.wait_for(channel.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(gen)
                    return JSONResponse(APIError(499, "client disconnected").body(), status_code=499)
                continue
            parts.append(text)
            for event in events:
                if event[0] == "done":
                    return JSONResponse(shape.final("".join(parts), event[1]))
                if event[0] == "error":
                    status, message = event[1]
                    raise APIError(status, message)
    except asyncio.CancelledError:
        engine.cancel(gen)
        raise
