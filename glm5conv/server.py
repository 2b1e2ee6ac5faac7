"""OpenAI-compatible HTTP server over the bundled runtime (FastAPI + uvicorn).

Endpoints: /v1/completions and /v1/chat/completions (both with SSE streaming), /v1/models,
/health and /metrics (Prometheus text: tokens/s, accept length, requests). One request generates
at a time (batch 1): concurrent requests queue on a lock and each gets its own tokens, never
another's. Bad requests get a 4xx OpenAI-style JSON error and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from glm5conv.runtime import GenerateResult, LoadedModel

MAX_TOKENS_LIMIT = 4096


class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int = Field(default=16, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    stream: bool = False
    seed: int | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    stream: bool = False
    seed: int | None = None


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def chat_prompt(messages: list[ChatMessage]) -> str:
    """A plain template: one ``role: content`` line per message, then ``assistant: ``."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant: "


@dataclass
class Metrics:
    requests: int = 0
    errors: int = 0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    accept_lengths: list[int] = field(default_factory=list)

    def record(self, result: GenerateResult) -> None:
        self.requests += 1
        self.generated_tokens += len(result.token_ids)
        self.generation_seconds += result.seconds
        self.accept_lengths += result.accept_lengths

    def prometheus(self) -> str:
        tps = self.generated_tokens / self.generation_seconds if self.generation_seconds else 0.0
        accept = sum(self.accept_lengths) / len(self.accept_lengths) if self.accept_lengths else 0.0
        lines = [
            ("glm5conv_requests_total", "counter", "completed generation requests", self.requests),
            ("glm5conv_request_errors_total", "counter", "requests rejected with a 4xx error", self.errors),
            ("glm5conv_generated_tokens_total", "counter", "tokens generated", self.generated_tokens),
            (
                "glm5conv_generation_seconds_total",
                "counter",
                "seconds spent generating",
                round(self.generation_seconds, 6),
            ),
            ("glm5conv_tokens_per_second", "gauge", "generated tokens per second of generation", round(tps, 3)),
            ("glm5conv_mean_accept_length", "gauge", "mean tokens per speculative verify step", round(accept, 4)),
        ]
        return "".join(f"# HELP {n} {h}\n# TYPE {n} {t}\n{n} {v}\n" for n, t, h, v in lines)


def create_app(loaded: LoadedModel, *, model_name: str | None = None, speculative_num_steps: int = 3) -> FastAPI:
    name = model_name or loaded.path.name
    steps = speculative_num_steps if loaded.has_mtp else 0
    app = FastAPI(title="glm5conv", docs_url=None, redoc_url=None)
    metrics = Metrics()
    generation_lock = threading.Lock()  # one generation at a time on the model

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        metrics.errors += 1
        body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(RequestError)
    async def request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        return error(
            400, f"{where}: {first.get('msg', 'invalid request')}" if where else "invalid request body", where or None
        )

    def check_model(requested: str | None) -> None:
        if requested not in (None, "", name):
            raise RequestError(404, f"model '{requested}' does not exist (this server serves '{name}')", "model")

    def encode(prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            if loaded.tokenizer is None:
                raise RequestError(400, "this model has no tokenizer: send the prompt as a list of token ids", "prompt")
            ids = loaded.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return encode(prompt[0])
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            raise RequestError(400, "one prompt per request: a string or a list of token ids", "prompt")
        vocab = loaded.model.args.vocab_size
        if not ids:
            raise RequestError(400, "the prompt is empty", "prompt")
        if any(not 0 <= t < vocab for t in ids):
            raise RequestError(400, f"token ids must be in [0, {vocab})", "prompt")
        return ids

    def decode(ids: list[int]) -> str:
        return loaded.tokenizer.decode(ids) if loaded.tokenizer else ""

    def run(ids: list[int], max_tokens: int, temperature: float, seed: int | None, on_tokens=None) -> GenerateResult:
        with generation_lock:
            result = loaded.generate(ids, max_tokens, temperature, steps, seed, on_tokens=on_tokens)
        metrics.record(result)
        return result

    def usage(ids: list[int], result: GenerateResult) -> dict[str, Any]:
        return {
            "prompt_tokens": len(ids),
            "completion_tokens": len(result.token_ids),
            "total_tokens": len(ids) + len(result.token_ids),
        }

    def extra(result: GenerateResult) -> dict[str, Any]:
        return {
            "token_ids": result.token_ids,
            "accept_lengths": result.accept_lengths,
            "mean_accept_length": result.mean_accept_length,
            "tokens_per_s": round(result.tokens_per_s, 3),
        }

    async def stream(
        ids: list[int], max_tokens: int, temperature: float, seed: int | None, chunk
    ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        worker = loop.run_in_executor(
            None,
            lambda: run(
                ids, max_tokens, temperature, seed, lambda toks: loop.call_soon_threadsafe(queue.put_nowait, toks)
            ),
        )
        worker.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
        emitted: list[int] = []
        text_so_far = ""
        while (tokens := await queue.get()) is not None:
            emitted += tokens
            text = decode(emitted)
            # hold back a trailing incomplete UTF-8 sequence until its bytes arrive
            safe = text.rstrip("\ufffd") if loaded.tokenizer else ""
            delta, text_so_far = safe[len(text_so_far) :], safe
            yield f"data: {json.dumps(chunk(delta, tokens, None))}\n\n"
        result = await worker
        tail = decode(result.token_ids)[len(text_so_far) :]
        yield f"data: {json.dumps(chunk(tail, [], result.finish_reason) | {'usage': usage(ids, result), 'glm5conv': extra(result)})}\n\n"
        yield "data: [DONE]\n\n"

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> str:
        return metrics.prometheus()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "glm5conv"}]}

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        check_model(request.model)
        ids = encode(request.prompt)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, tokens: list[int], finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [choice]}

        if request.stream:
            return StreamingResponse(
                stream(ids, request.max_tokens, request.temperature, request.seed, chunk),
                media_type="text/event-stream",
            )
        result = await asyncio.to_thread(run, ids, request.max_tokens, request.temperature, request.seed)
        body = chunk(decode(result.token_ids), result.token_ids, result.finish_reason)
        return body | {"usage": usage(ids, result), "glm5conv": extra(result)}

    @app.post("/v1/chat/completions")
    async def chat(request: ChatRequest):
        check_model(request.model)
        if loaded.tokenizer is None:
            raise RequestError(400, "this model has no tokenizer: use /v1/completions with token ids", "messages")
        ids = encode(chat_prompt(request.messages))
        max_tokens = request.max_completion_tokens or request.max_tokens or 256
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, tokens: list[int], finish: str | None) -> dict[str, Any]:
            choice = {
                "index": 0,
                "delta": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [choice],
            }

        if request.stream:
            return StreamingResponse(
                stream(ids, max_tokens, request.temperature, request.seed, chunk), media_type="text/event-stream"
            )
        result = await asyncio.to_thread(run, ids, max_tokens, request.temperature, request.seed)
        message = {"role": "assistant", "content": decode(result.token_ids)}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": result.finish_reason}
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [choice],
            "usage": usage(ids, result),
            "glm5conv": extra(result),
        }

    return app


def serve(loaded: LoadedModel, host: str, port: int, speculative_num_steps: int, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(
        create_app(loaded, speculative_num_steps=speculative_num_steps), host=host, port=port, log_level=log_level
    )
