"""The OpenAI-compatible wire format: request bodies, response bodies and error JSON."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edge_infer.generation.sampling import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")


def check_text(text: str) -> str:
    """``text`` if it is valid Unicode; JSON's ``\\ud800`` escapes can make lone surrogates,
    which no tokenizer (and no UTF-8 encoder) accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the text holds a lone UTF-16 surrogate ({text[exc.start]!r} at character "
            f"{exc.start}), which is not valid Unicode"
        ) from None
    return text


class ContentPart(BaseModel):
    """One part of a message's content; only text parts are understood."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    @field_validator("content")
    @classmethod
    def _valid_content(cls, content: str | list[ContentPart] | None) -> Any:
        # checked here, not in ContentPart: an error inside one member of the union would be
        # reported once per member
        for text in [content] if isinstance(content, str) else [p.text for p in content or []]:
            if text is not None:
                check_text(text)
        return content

    def text(self) -> str:
        """The content as one string (text parts joined; other parts refused)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        pieces = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(
                    f"message content of type {part.type!r} is not supported "
                    "(this model reads text only)"
                )
            pieces.append(part.text)
        return "".join(pieces)

    def to_dict(self) -> dict[str, str]:
        """The message as the chat template takes it ("developer" is a system message)."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Generation(BaseModel):
    """Options both endpoints take; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    agent: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 16:
            raise ValueError("at most 16 stop strings")
        if stop == "" or (isinstance(stop, list) and any(s == "" for s in stop)):
            raise ValueError("stop strings must not be empty")
        for s in [stop] if isinstance(stop, str) else stop or []:
            check_text(s)
        return stop

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The request's options as SamplingParams (our defaults where it is silent)."""
        # max_completion_tokens replaces max_tokens in OpenAI's API; 0 is a valid bound
        max_tokens = self.max_completion_tokens
        if max_tokens is None:
            max_tokens = self.max_tokens
        return SamplingParams.from_kwargs(
            None,
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=self.stop,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)

    def message_dicts(self) -> list[dict[str, str]]:
        return [m.to_dict() for m in self.messages]


class CompletionRequest(_Generation):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _valid_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        for text in [prompt] if isinstance(prompt, str) else prompt:
            check_text(text)
        return prompt

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("prompt must be one string (batches of prompts are not supported)")
            return self.prompt[0]
        return self.prompt


class ForkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


# -- responses -----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_json(usage: Any) -> dict[str, Any]:
    """OpenAI ``usage`` from our Usage, with the timing we measured as extra fields."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "ttft_ms": round(usage.ttft_s * 1000, 1),
        "decode_tokens_per_s": round(usage.decode_tokens_per_s, 1),
    }


def chat_completion(rid: str, model: str, text: str, usage: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": usage.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": usage_json(usage),
    }


def chat_chunk(
    rid: str,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: Any = None,
) -> dict[str, Any]:
    """One streamed chunk; ``delta=None`` makes the usage-only chunk (no choices)."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        body["usage"] = usage_json(usage)
    return body


def completion(
    rid: str, model: str, text: str, finish_reason: str | None, usage: Any = None
) -> dict[str, Any]:
    """A text completion, or (streaming) one chunk of it."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}],
    }
    if usage is not None:
        body["usage"] = usage_json(usage)
    return body


def error_json(
    message: str, kind: str = "invalid_request_error", code: str | None = None, param: Any = None
) -> dict[str, Any]:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error the server answers (OpenAI's shape)."""

    error: ErrorDetail
