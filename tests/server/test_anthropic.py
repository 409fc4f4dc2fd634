"""Anthropic's Messages API: requests become chat messages, replies and events; then a real
server answering the official anthropic client."""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
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
from tests.support.server_process import running_server


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
    # Anthropic's ids in our form, so an agent's stored calls match what the client sends
    assert msgs[2]["tool_calls"][0]["id"] == "call_1"
    assert msgs[3] == {"role": "tool", "tool_call_id": "call_1", "content": "3 C"}
    assert req.openai_tools()[0]["function"]["name"] == "w"


def test_blocks_sent_back_as_the_sdk_returned_them_are_taken():
    blocks = [
        anthropic.types.TextBlock(type="text", text="Checking.").model_dump(),
        anthropic.types.ToolUseBlock(
            type="tool_use", id="toolu_9", name="w", input={}
        ).model_dump(),
    ]
    assert any(v is None for b in blocks for v in b.values())  # caller, citations...
    req = MessagesRequest.model_validate(
        {"max_tokens": 1, "messages": [{"role": "assistant", "content": blocks}]}
    )
    assert req.chat_messages()[0]["tool_calls"][0]["id"] == "call_9"
    with pytest.raises(pydantic.ValidationError, match="caller"):
        MessagesRequest.model_validate(
            {
                "max_tokens": 1,
                "messages": [
                    {"role": "assistant", "content": [{**blocks[1], "caller": {"type": "direct"}}]}
                ],
            }
        )


def test_unknown_fields_and_bad_choices_are_refused():
    with pytest.raises(pydantic.ValidationError, match="thinking"):
        MessagesRequest.model_validate(
            {"max_tokens": 1, "messages": [{"role": "user", "content": "x"}], "thinking": {}}
        )
    with pytest.raises(pydantic.ValidationError, match="surrogate"):
        MessagesRequest.model_validate(
            {"max_tokens": 1, "messages": [{"role": "user", "content": "\ud800"}]}
        )
    with pytest.raises(pydantic.ValidationError, match="empty"):
        MessagesRequest.model_validate(
            {
                "max_tokens": 1,
                "messages": [{"role": "user", "content": "x"}],
                "stop_sequences": [""],
            }
        )
    for bound in ("40", 40.0, True):  # never coerced into a (possibly huge) token bound
        with pytest.raises(pydantic.ValidationError, match="max_tokens"):
            MessagesRequest.model_validate(
                {"max_tokens": bound, "messages": [{"role": "user", "content": "x"}]}
            )
    with pytest.raises(ValueError, match="name"):
        ToolChoice(type="tool").openai()
    assert ToolChoice(type="any").openai() == "required"


def test_reply_and_stream_events():
    usage = Usage(prompt_tokens=30, cached_tokens=20, completion_tokens=5, finish_reason="stop")
    call = ToolCall("call_abc", "w", '{"c": "Oslo"}')
    body = message("m", "Hi", [call], usage)
    assert body["stop_reason"] == "tool_use"
    assert body["content"][1] == {
        "type": "tool_use",
        "id": "toolu_abc",
        "name": "w",
        "input": {"c": "Oslo"},
    }
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


# -- a real server ---------------------------------------------------------------------------

LONG_SYSTEM = "You are a careful assistant who answers briefly and checks every fact. " * 150
HI = [{"role": "user", "content": "Hi"}]
GREEDY = {"temperature": 0}  # sampling options are extra fields in the current anthropic SDK
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}},
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("anthropic") / "cache"


@pytest.fixture(scope="module")
def server(cache_dir):
    with running_server(cache_dir) as srv:
        yield srv


def client_of(server, agent: str | None = None) -> anthropic.Anthropic:
    headers = {"x-agent-id": agent} if agent else None
    return anthropic.Anthropic(
        base_url=server.url, api_key="unused", max_retries=0, default_headers=headers
    )


@pytest.mark.slow
def test_create_and_stream_return_text(server):
    client = client_of(server)
    r = client.messages.create(model="m", max_tokens=6, messages=HI, extra_body=GREEDY)
    assert r.content[0].type == "text" and r.content[0].text
    assert r.stop_reason in ("end_turn", "max_tokens") and r.usage.output_tokens <= 6
    with client.messages.stream(model="m", max_tokens=6, messages=HI, extra_body=GREEDY) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(pieces) == final.content[0].text == r.content[0].text


@pytest.mark.slow
def test_stop_sequences_and_errors_in_anthropic_shape(server):
    client = client_of(server)
    r = client.messages.create(
        model="m", max_tokens=16, messages=HI, extra_body=GREEDY, stop_sequences=["!"]
    )
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "!"  # "Hello! ..."
    assert r.content[0].text and "!" not in r.content[0].text
    bad = httpx.post(
        f"{server.url}/v1/messages", json={"max_tokens": 1, "messages": HI, "thinking": {}}
    )
    assert bad.status_code == 400
    assert bad.json()["type"] == "error" and "thinking" in bad.json()["error"]["message"]


@pytest.mark.slow
def test_a_tools_request_yields_a_valid_tool_use_block(server):
    client = client_of(server)
    kw = dict(
        model="m",
        max_tokens=48,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=[WEATHER],
        tool_choice={"type": "any"},
    )
    r = client.messages.create(**kw)
    (use,) = [b for b in r.content if b.type == "tool_use"]
    assert r.stop_reason == "tool_use" and use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER["input_schema"])
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    (use,) = [b for b in final.content if b.type == "tool_use"]
    jsonschema.validate(use.input, WEATHER["input_schema"])
    # the result goes back as a tool_result block, and the model answers it
    follow = client.messages.create(
        model="m",
        max_tokens=6,
        extra_body=GREEDY,
        tools=[WEATHER],
        messages=[
            *kw["messages"],
            {"role": "assistant", "content": [use.model_dump()]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "3 C"}],
            },
        ],
    )
    assert follow.content[0].type == "text" and follow.content[0].text


@pytest.mark.slow
def test_a_repeated_long_system_prompt_is_read_from_the_prefix_cache(server):
    client = client_of(server)
    first = client.messages.create(model="m", max_tokens=2, system=LONG_SYSTEM, messages=HI)
    second = client.messages.create(model="m", max_tokens=2, system=LONG_SYSTEM, messages=HI)
    total = first.usage.input_tokens + first.usage.cache_read_input_tokens
    assert total > 1500
    assert second.usage.cache_read_input_tokens >= total - 8
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == total


@pytest.mark.slow
def test_a_named_agent_reads_its_cache_after_a_restart(server, cache_dir):
    """Last in the module: it stops the module's server."""
    client = client_of(server, agent="coder")
    kw = dict(model="m", max_tokens=2, system=LONG_SYSTEM, messages=HI, extra_body=GREEDY)
    counted = client.messages.count_tokens(model="m", system=LONG_SYSTEM, messages=HI)
    first = client.messages.create(**kw)
    assert first.usage.cache_read_input_tokens == 0  # a new agent holds nothing yet
    assert first.usage.input_tokens == counted.input_tokens
    assert server.stop() == 0
    with running_server(cache_dir) as again:
        second = client_of(again, agent="coder").messages.create(**kw)
    assert second.usage.cache_read_input_tokens > 1500
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == counted.input_tokens
