"""The OpenAI request bodies the server accepts (pydantic, strict types) and its errors in OpenAI's shape.

Fields of OpenAI's API that change nothing here (user, metadata, store, ...) are accepted; ones the
server cannot honour (n > 1, logprobs, tools, penalties, ...) are refused with a 400 naming them,
rather than ignored. Unknown fields are ignored. Extensions: session_id, top_k, repetition_penalty,
ignore_eos.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .states import SESSION_ID


class APIError(Exception):
    """An error response: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             409: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _Sampling(_Strict):
    """Fields common to both endpoints."""

    model: str
    max_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, lt=2**63)  # OpenAI's range (int64), which torch.Generator takes
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions
    session_id: str | None = Field(None, pattern=SESSION_ID.pattern)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False

    def refuse_unsupported(self) -> None:
        if self.n != 1:
            raise APIError(400, "n > 1 is not supported: ask once per completion", "n", "unsupported")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (use repetition_penalty)", name, "unsupported")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", "logit_bias", "unsupported")
        stops = self.stop_list()
        if len(stops) > 4:
            raise APIError(400, "stop takes at most 4 sequences", "stop", "invalid_value")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported", "echo", "unsupported")
        if self.logprobs is not None:
            raise APIError(400, "logprobs is not supported", "logprobs", "unsupported")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of > 1 is not supported", "best_of", "unsupported")
        if self.suffix:
            raise APIError(400, "suffix is not supported", "suffix", "unsupported")

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)) or not p:
            return p if isinstance(p, str) else list(p)
        if len(p) != 1:
            raise APIError(400, f"one prompt per request, got {len(p)}", "prompt", "unsupported")
        return p[0] if isinstance(p[0], str) else list(p[0])


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.logprobs or self.top_logprobs:
            raise APIError(400, "logprobs is not supported", "logprobs", "unsupported")
        if self.tools:
            raise APIError(400, "tools are not supported", "tools", "unsupported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", "response_format", "unsupported")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_error(e: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (e.g. messages.0.content)."""
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and (p.split("[")[0] in _TYPE_TAGS
                                                                        or "[" in p or p.startswith("function")))]
    param = ".".join(loc) or None
    given = err.get("input")
    shown = repr(given) if len(repr(given)) <= 60 else repr(given)[:57] + "..."
    if err["type"] == "missing":
        message = f"'{param}' is a required field"
    else:
        message = f"invalid value for '{param}': {err['msg']} (got {shown})"
    return APIError(400, message, param, "invalid_type" if err["type"].endswith("_type") else "invalid_value")
