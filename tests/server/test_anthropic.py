"""Anthropic's Messages wire format: requests become chat messages; replies and events."""

from __future__ import annotations

import json

import pydantic
import pytest

from edge_infer.generation.sequence import Usage
from edge_infer.generation.tools import ToolCall
from edge_infer.server.anthropic import (
    MessagesRequest,
    MessageStream,
    ToolChoice,
    message,
)


def test_a_conversation_with_tool_use_becomes_chat_messages():
    req = MessagesRequest.model_validate(
        {
            "max_tokens": 64,
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "x"}}],
            "messages": [
                {"role": "user", "content": "Weather in Oslo?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"c": "Oslo"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "3 C"},
                        {"type": "text", "text": "And tomorrow?"},
                    ],
                },
            ],
            "tools": [{"name": "w", "input_schema": {"type": "object"}}],
        }
    )
    msgs = req.chat_messages()
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "user"]
    assert msgs[2]["tool_calls"][0]["function"] == {"name": "w", "arguments": '{"c": "Oslo"}'}
    assert msgs[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "3 C"}
    assert req.openai_tools()[0]["function"]["name"] == "w"


def test_unknown_fields_and_bad_choices_are_refused():
    with pytest.raises(pydantic.ValidationError, match="thinking"):
        MessagesRequest.model_validate(
            {"max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "thinking": {}}
        )
    with pytest.raises(ValueError, match="name"):
        ToolChoice(type="tool").openai()
    assert ToolChoice(type="any").openai() == "required"


def test_reply_and_stream_events():
    usage = Usage(prompt_tokens=30, cached_tokens=20, completion_tokens=5, finish_reason="stop")
    call = ToolCall("call_abc", "w", '{"c": "Oslo"}')
    body = message("m", "Hi", [call], usage)
    assert body["stop_reason"] == "tool_use"
    assert body["content"][1] == {"type": "tool_use", "id": "toolu_abc", "name": "w",
                                  "input": {"c": "Oslo"}}
    assert body["usage"]["cache_read_input_tokens"] == 20 and body["usage"]["input_tokens"] == 10
    s = MessageStream("m")
    events = [*s.start(usage), *s.text("Hel"), *s.text("lo"), *s.finish([call], usage, None)]
    kinds = [e.split("\n")[0].removeprefix("event: ") for e in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    last_delta = json.loads(events[-2].split("data: ", 1)[1])
    assert last_delta["delta"]["stop_reason"] == "tool_use"
