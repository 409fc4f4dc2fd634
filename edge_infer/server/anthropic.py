"""Anthropic's Messages API wire format: requests to chat messages, replies and stream events."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from edge_infer.generation.tools import ToolCall
from edge_infer.server.images import ResolveImage
from edge_infer.server.protocol import check_text
from edge_infer.server.structured import RequestError

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
TOOL_USE_PREFIX, CALL_PREFIX = "toolu_", "call_"


class _Block(BaseModel):
    """A content block. Fields the current SDK adds to blocks it returns (``caller``...)
    are taken when null, so a reply's blocks can be sent back as they came."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls.model_fields}
        return data


class TextBlock(_Block):
    type: Literal["text"]
    text: str
    cache_control: dict[str, Any] | None = None  # a hint for Anthropic's servers; ours caches


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: dict[str, Any] | None = None


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False
    cache_control: dict[str, Any] | None = None

    def text(self) -> str:
        body = (
            self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        )
        return f"Error: {body}" if self.is_error else body


class ImageSource(_Block):
    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None

    def as_url(self) -> str:
        """The image as a URL: a data: URI for base64 data."""
        if self.type == "url":
            if self.url is None:
                raise ValueError("an image source of type 'url' needs a url")
            return self.url
        if self.data is None:
            raise ValueError("an image source of type 'base64' needs data")
        return f"data:{self.media_type or 'image'};base64,{self.data}"


class ImageBlock(_Block):
    type: Literal["image"]
    source: ImageSource
    cache_control: dict[str, Any] | None = None


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock, Field(discriminator="type")
]


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant"]
    content: str | list[Block]


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    description: str = ""
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None

    def openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.input_schema,
            },
        }


class ToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False

    def openai(self) -> str | dict[str, Any]:
        """The same choice in OpenAI's words."""
        if self.type == "tool":
            if not self.name:
                raise ValueError("tool_choice of type 'tool' needs a name")
            return {"type": "function", "function": {"name": self.name}}
        return {"auto": "auto", "any": "required", "none": "none"}[self.type]


def _valid_strings(value: Any) -> None:
    """Every string in a request body is valid Unicode (no lone surrogates from JSON)."""
    if isinstance(value, str):
        check_text(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _valid_strings(k)
            _valid_strings(v)
    elif isinstance(value, list):
        for v in value:
            _valid_strings(v)


class _Request(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        _valid_strings(data)
        return data


class MessagesRequest(_Request):
    """``POST /v1/messages``: what we take (other fields get a 400 naming them)."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    max_tokens: StrictInt = Field(ge=0)  # "5000" or 5000.0 is refused, not coerced
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=16)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _no_empty_stop(cls, stops: list[str] | None) -> list[str] | None:
        if stops and any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return stops

    def system_text(self) -> str | None:
        if self.system is None:
            return None
        if isinstance(self.system, str):
            return self.system
        return "".join(b.text for b in self.system)

    def chat_messages(self, resolve: ResolveImage | None = None) -> list[dict[str, Any]]:
        """The conversation as chat-template messages (OpenAI's roles and tool fields); image
        blocks become ``image_url`` parts whose URL ``resolve(url, field)`` gives (without
        ``resolve`` they are refused)."""
        out: list[dict[str, Any]] = []
        system = self.system_text()
        if system:
            out.append({"role": "system", "content": system})
        for i, m in enumerate(self.messages):
            blocks = (
                [TextBlock(type="text", text=m.content)]
                if isinstance(m.content, str)
                else (m.content)
            )
            if m.role == "assistant":
                for j, b in enumerate(blocks):
                    if isinstance(b, ImageBlock):
                        field = f"messages[{i}].content[{j}]"
                        raise RequestError(field, f"{field}: an assistant message holds no image")
                text = "".join(b.text for b in blocks if isinstance(b, TextBlock))
                calls = [
                    ToolCall(call_id(b.id), b.name, json.dumps(b.input, ensure_ascii=False))
                    for b in blocks
                    if isinstance(b, ToolUseBlock)
                ]
                msg: dict[str, Any] = {"role": "assistant", "content": text}
                if calls:
                    msg["tool_calls"] = [c.openai() for c in calls]
                out.append(msg)
                continue
            parts: list[dict[str, Any]] = []
            for j, b in enumerate(blocks):
                if isinstance(b, ToolResultBlock):
                    if parts:
                        out.append({"role": "user", "content": _content(parts)})
                        parts = []
                    result = {"role": "tool", "tool_call_id": call_id(b.tool_use_id)}
                    out.append({**result, "content": b.text()})
                elif isinstance(b, TextBlock):
                    parts.append({"type": "text", "text": b.text})
                elif isinstance(b, ImageBlock):
                    field = f"messages[{i}].content[{j}].source"
                    if resolve is None:
                        raise RequestError(field, f"{field}: images are not taken here")
                    try:
                        url = resolve(b.source.as_url(), field)
                    except ValueError as exc:
                        if isinstance(exc, RequestError):
                            raise
                        raise RequestError(field, f"{field}: {exc}") from None
                    parts.append({"type": "image_url", "image_url": {"url": url}})
                else:
                    raise ValueError("a user message cannot hold a tool_use block")
            if parts or not blocks:
                out.append({"role": "user", "content": _content(parts)})
        return out

    def openai_tools(self) -> list[dict[str, Any]] | None:
        return [t.openai() for t in self.tools] if self.tools else None


class CountTokensRequest(_Request):
    """``POST /v1/messages/count_tokens``."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None

    def as_messages_request(self) -> MessagesRequest:
        return MessagesRequest(
            max_tokens=0,
            messages=self.messages,
            system=self.system,
            tools=self.tools,
            tool_choice=self.tool_choice,
        )


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text parts as one string; with an image among them, the parts."""
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def new_message_id() -> str:
    return "msg_" + uuid.uuid4().hex[:24]


def tool_use_id(call: ToolCall) -> str:
    """Anthropic's id form for a call (ours start with "call_")."""
    return TOOL_USE_PREFIX + call.id.removeprefix(CALL_PREFIX)


def call_id(tool_use_id: str) -> str:
    """Our id form of an Anthropic ``tool_use`` id (so an agent's stored calls match)."""
    if tool_use_id.startswith(TOOL_USE_PREFIX):
        return CALL_PREFIX + tool_use_id.removeprefix(TOOL_USE_PREFIX)
    return tool_use_id


def usage_json(usage: Any) -> dict[str, int]:
    """Anthropic's usage; a prompt with images adds the image tokens it holds (kept by
    dropping) and how many there were before dropping."""
    cached = int(usage.cached_tokens)
    out = {
        "input_tokens": int(usage.prompt_tokens) - cached,
        "output_tokens": int(usage.completion_tokens),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }
    if usage.image_tokens_total:
        out["image_tokens"] = int(usage.image_tokens)
        out["image_tokens_total"] = int(usage.image_tokens_total)
    return out


def content_blocks(text: str, calls: list[ToolCall]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text or not calls else []
    blocks += [
        {"type": "tool_use", "id": tool_use_id(c), "name": c.name, "input": json.loads(c.arguments)}
        for c in calls
    ]
    return blocks


def stop_reason(finish_reason: str, calls: list[ToolCall], stopped_by: str | None) -> str:
    if calls:
        return "tool_use"
    if stopped_by is not None:
        return "stop_sequence"
    return STOP_REASONS.get(finish_reason, "end_turn")


def message(
    model: str,
    text: str,
    calls: list[ToolCall],
    usage: Any,
    stopped_by: str | None = None,
    mid: str | None = None,
) -> dict[str, Any]:
    """A whole (non-streamed) reply."""
    return {
        "id": mid or new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content_blocks(text, calls),
        "stop_reason": stop_reason(usage.finish_reason, calls, stopped_by),
        "stop_sequence": stopped_by,
        "usage": usage_json(usage),
    }


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    """The body of every error the Messages routes answer (Anthropic's shape)."""

    type: Literal["error"]
    error: AnthropicErrorDetail


def error_json(message_text: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """Anthropic's error body."""
    return {"type": "error", "error": {"type": kind, "message": message_text}}


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


class MessageStream:
    """Turns a reply's text pieces (and its calls at the end) into Anthropic's stream events."""

    def __init__(self, model: str, mid: str | None = None) -> None:
        self.model = model
        self.mid = mid or new_message_id()
        self._index = -1
        self._text_open = False

    def start(self, usage: Any) -> Iterator[str]:
        head = message(self.model, "", [], usage, mid=self.mid)
        head.update(content=[], stop_reason=None, stop_sequence=None)
        yield sse("message_start", {"type": "message_start", "message": head})

    def text(self, piece: str) -> Iterator[str]:
        if not piece:
            return
        if not self._text_open:
            self._index += 1
            self._text_open = True
            yield sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": self._index,
                    "content_block": {"type": "text", "text": ""},
                },
            )
        yield sse(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": self._index,
                "delta": {"type": "text_delta", "text": piece},
            },
        )

    def _close_text(self) -> Iterator[str]:
        if self._text_open:
            self._text_open = False
            yield sse("content_block_stop", {"type": "content_block_stop", "index": self._index})

    def finish(self, calls: list[ToolCall], usage: Any, stopped_by: str | None) -> Iterator[str]:
        yield from self._close_text()
        for c in calls:
            self._index += 1
            yield sse(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": self._index,
                    "content_block": {
                        "type": "tool_use",
                        "id": tool_use_id(c),
                        "name": c.name,
                        "input": {},
                    },
                },
            )
            yield sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": self._index,
                    "delta": {"type": "input_json_delta", "partial_json": c.arguments},
                },
            )
            yield sse("content_block_stop", {"type": "content_block_stop", "index": self._index})
        yield sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": stop_reason(usage.finish_reason, calls, stopped_by),
                    "stop_sequence": stopped_by,
                },
                "usage": usage_json(usage),
            },
        )
        yield sse("message_stop", {"type": "message_stop"})
