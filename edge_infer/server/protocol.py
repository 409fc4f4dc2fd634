"""The OpenAI-compatible wire format: request bodies, response bodies and error JSON."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import TokenLogprob
from edge_infer.server.images import ResolveImage
from edge_infer.server.structured import RequestError

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_TOP_LOGPROBS = 20


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


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str
    detail: str | None = None  # OpenAI's resolution hint; dropping sets what is kept here


class ContentPart(BaseModel):
    """One part of a message's content: text, or (for a VLM) ``image_url``."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    """A chat message. Tool-call fields are kept with the message (and rendered by templates
    that know them); any other field is refused."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

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

    def parts(self, index: int, resolve: ResolveImage) -> str | list[dict[str, Any]]:
        """The content as text, or (when it holds images) as text and ``image_url`` parts,
        each image's URL made a data: URI by ``resolve(url, field)``."""
        if not isinstance(self.content, list) or all(p.type == "text" for p in self.content):
            return self.text()
        out: list[dict[str, Any]] = []
        for j, part in enumerate(self.content):
            field = f"messages[{index}].content[{j}]"
            if part.type == "text" and part.text is not None:
                out.append({"type": "text", "text": part.text})
            elif part.type == "image_url" and part.image_url is not None:
                url = resolve(part.image_url.url, f"{field}.image_url")
                out.append({"type": "image_url", "image_url": {"url": url}})
            else:
                raise RequestError(
                    field, f"{field}: message content of type {part.type!r} is not supported"
                )
        return out

    def to_dict(self, index: int = 0, resolve: ResolveImage | None = None) -> dict[str, Any]:
        """The message as the chat template takes it ("developer" is a system message); with
        ``resolve``, image parts are kept (see :meth:`parts`), else refused."""
        role = "system" if self.role == "developer" else self.role
        content = self.text() if resolve is None else self.parts(index, resolve)
        out: dict[str, Any] = {"role": role, "content": content}
        for key in ("name", "tool_calls", "tool_call_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Generation(BaseModel):
    """Options both endpoints take. The fields declared here and in the subclasses are all
    the server honours: any other field is refused (``unsupported_parameter``), so a client
    never gets a 200 that silently ignored what it asked for."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    # strict: a token bound given as "5000", 5000.0 or true is a client's mistake, not a bound
    max_tokens: StrictInt | None = Field(default=None, ge=0)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: StrictInt = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    agent: str | None = None
    prompt_cache_key: str | None = Field(default=None, min_length=1, max_length=1024)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("prompt_cache_key")
    @classmethod
    def _valid_key(cls, key: str | None) -> str | None:
        return None if key is None else check_text(key)

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
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # the reply's shape: OpenAI's response_format, or a llama.cpp GBNF grammar
    response_format: dict[str, Any] | None = None
    grammar: str | None = Field(default=None, min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # image-token dropping for this request (the server's --visual-* flags otherwise)
    visual_budget: float | None = Field(default=None, gt=0, le=1)
    visual_method: Literal["full", "hired", "uniform", "cls-topk"] | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def message_dicts(self, resolve: ResolveImage | None = None) -> list[dict[str, Any]]:
        """The messages for the chat template; image parts kept only with ``resolve``."""
        return [m.to_dict(i, resolve) for i, m in enumerate(self.messages)]

    def logprobs_top(self) -> int | None:
        """How many alternatives to give per token, or None for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Generation):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprobs_top(self) -> int | None:
        """How many alternatives to give per token (``logprobs`` is that number here, as in
        OpenAI's completions API), or None for no logprobs."""
        return self.logprobs

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


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    content: str
    add_special: bool | None = None  # BOS as the model asks for it, unless said
    with_pieces: bool = False

    @field_validator("content")
    @classmethod
    def _valid_content(cls, content: str) -> str:
        return check_text(content)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[int]


class ApplyTemplateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages: list[Message] = Field(min_length=1)
    add_generation_prompt: bool = True

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.messages]


def honoured_fields(model: type[BaseModel]) -> list[str]:
    """The request fields ``model`` honours (all others are refused)."""
    return list(model.model_fields)


# -- responses -----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_json(usage: Any) -> dict[str, Any]:
    """OpenAI ``usage`` from our Usage, with the timing we measured as extra fields; a prompt
    with images says how many image tokens it holds (kept by dropping) of how many."""
    details = {"cached_tokens": usage.cached_tokens}
    if usage.image_tokens_total:
        details["image_tokens"] = usage.image_tokens
        details["image_tokens_total"] = usage.image_tokens_total
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": details,
        "ttft_ms": round(usage.ttft_s * 1000, 1),
        "decode_tokens_per_s": round(usage.decode_tokens_per_s, 1),
    }


# JSON has no -inf; OpenAI gives this for tokens the model rules out
LOGPROB_FLOOR = -9999.0

TokenBytes = Callable[[int], bytes]


def _token(token_bytes: TokenBytes, token: int) -> tuple[str, bytes]:
    raw = token_bytes(token)
    return raw.decode("utf-8", errors="replace"), raw


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def chat_logprobs(entries: Sequence[TokenLogprob], token_bytes: TokenBytes) -> dict[str, Any]:
    """``choices[].logprobs`` of a chat completion (or chunk) for ``entries``."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        text, raw = _token(token_bytes, token)
        return {"token": text, "logprob": _logprob(logprob), "bytes": list(raw)}

    content = [
        {**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    entries: Sequence[TokenLogprob], token_bytes: TokenBytes, offset: int = 0
) -> dict[str, Any]:
    """``choices[].logprobs`` of a text completion (OpenAI's older shape); ``offset`` is where
    the first token's text starts in the completion."""
    tokens, offsets = [], []
    for e in entries:
        text = _token(token_bytes, e.token)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [_logprob(e.logprob) for e in entries],
        "top_logprobs": [
            {_token(token_bytes, t)[0]: _logprob(lp) for t, lp in e.top} for e in entries
        ],
        "text_offset": offsets,
    }


def chat_completion(
    rid: str,
    model: str,
    text: str,
    usage: Any,
    logprobs: dict[str, Any] | None = None,
    tool_calls: Sequence[Any] = (),
) -> dict[str, Any]:
    """A whole chat completion; with ``tool_calls`` (ToolCall) the message carries them and
    the finish reason is "tool_calls"."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    reason = usage.finish_reason or "stop"
    if tool_calls:
        message = {
            "role": "assistant",
            "content": text or None,
            "tool_calls": [c.openai() for c in tool_calls],
        }
        reason = "tool_calls"
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": reason,
                "logprobs": logprobs,
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
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed chunk; ``delta=None`` makes the usage-only chunk (no choices)."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}],
    }
    if usage is not None:
        body["usage"] = usage_json(usage)
    return body


def completion(
    rid: str,
    model: str,
    text: str,
    finish_reason: str | None,
    usage: Any = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A text completion, or (streaming) one chunk of it."""
    body: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
        ],
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
