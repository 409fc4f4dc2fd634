"""Structured output and tool calls: the request's plan and the reply's split, then through a
real server with the official openai client (JSON schemas, grammars, tools, agents)."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from edge_infer.generation.tools import ToolCall
from edge_infer.server.structured import (
    CallSplitter,
    RequestError,
    call_deltas,
    plan_output,
)
from tests.support.server_process import running_server

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_PARAMS,
    },
}
ASK = {"role": "user", "content": "What is the weather in Paris?"}
PERSON = 'Give a JSON object with the keys "name" and "age" of a person.'


class City(BaseModel):
    name: str = Field(max_length=20)
    population: int = Field(ge=0, le=100_000_000)


# -- the plan and the split (no server) ----------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


def test_plans_follow_tool_choice(tokenizer):
    assert plan_output(tokenizer).grammar is None
    auto = plan_output(tokenizer, tools=[WEATHER])
    assert (auto.call_format, auto.grammar, auto.requires_call) == ("hermes", None, False)
    none = plan_output(tokenizer, tools=[WEATHER], tool_choice="none")
    assert none.call_format is None and [t.name for t in none.tools] == ["get_weather"]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        forced = plan_output(tokenizer, tools=[WEATHER], tool_choice=choice)
        assert forced.requires_call and forced.grammar is not None


@pytest.mark.parametrize(
    "kwargs, param, fragment",
    [
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "sometimes"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
            "'x'",
        ),
        ({"tools": [{"type": "function", "function": {}}]}, "tools", "tools[0]"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {}}}}},
            "response_format",
            '"not"',
        ),
        ({"response_format": {"type": "xml"}}, "response_format", "xml"),
        ({"gbnf": "root ::= ("}, "grammar", "grammar"),
        (
            {"response_format": {"type": "json_object"}, "gbnf": 'root ::= "a"'},
            "grammar",
            "not both",
        ),
        (
            {"response_format": {"type": "json_object"}, "tools": [WEATHER]},
            "tool_choice",
            "none",
        ),
    ],
)
def test_bad_plans_name_the_field(tokenizer, kwargs, param, fragment):
    with pytest.raises(RequestError, match=re.escape(fragment)) as err:
        plan_output(tokenizer, **kwargs)
    assert err.value.param == param


def test_the_splitter_streams_text_and_holds_back_calls():
    call = ToolCall("call_1", "f", '{"a": 1}')
    s = CallSplitter("hermes")
    fed = [s.feed(p) for p in ["Sure", ", let me <to", "ol_call>\n{", '"name": "f"}']]
    assert fed == ["Sure", ", let me ", "", ""]
    assert s.rest("Sure, let me", [call]) == ""
    plain = CallSplitter("hermes")
    assert "".join(plain.feed(p) for p in ["a <", "b"]) == "a <b"
    held = CallSplitter("hermes")
    assert held.feed("x <tool") == "x " and held.rest("x <tool", []) == "<tool"
    forced = CallSplitter("hermes", requires_call=True)
    assert forced.feed("anything") == ""
    llama = CallSplitter("llama3")
    assert llama.feed(" ") == "" and llama.feed("Hi") == " Hi" and llama.feed("!") == "!"
    assert CallSplitter("llama3").feed('{"name"') == ""


def test_call_deltas_open_each_call_then_send_fragments():
    calls = [ToolCall("c1", "f", json.dumps({"text": "x" * 40})), ToolCall("c2", "g", "{}")]
    deltas = [d[0] for d in call_deltas(calls)]
    assert deltas[0] == {
        "index": 0,
        "id": "c1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    first = [d["function"]["arguments"] for d in deltas if d["index"] == 0]
    assert len(first) > 2 and "".join(first) == calls[0].arguments
    assert [d for d in deltas if d["index"] == 1][0]["id"] == "c2"


# -- a real server ---------------------------------------------------------------------------

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("structured") / "cache") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def conversation(server, agent: str) -> list[dict]:
    return httpx.get(f"{server.url}/v1/agents/{agent}").json()["conversation"]


@slow
@pytest.mark.parametrize("agent", [False, True], ids=["stateless", "agent"])
def test_parse_into_a_pydantic_model_for_five_seeds(client, agent):
    ask = [{"role": "user", "content": "Describe a city as JSON."}]
    for seed in range(5):
        extra = {"agent": f"city-{seed}"} if agent else None
        kw = dict(temperature=0.7, seed=seed, max_tokens=48, extra_body=extra)
        done = client.chat.completions.parse(model="m", messages=ask, response_format=City, **kw)
        assert isinstance(done.choices[0].message.parsed, City), done
        with client.chat.completions.stream(
            model="m", messages=ask, response_format=City, **kw
        ) as stream:
            streamed = stream.get_final_completion()
        assert isinstance(streamed.choices[0].message.parsed, City), streamed


@slow
def test_json_object_and_gbnf_grammar(client):
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": PERSON}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=64,
    )
    assert isinstance(json.loads(r.choices[0].message.content), dict), r
    r = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "Is the sky blue?"}],
        temperature=0.7,
        max_tokens=8,
        extra_body={"grammar": 'root ::= "yes" | "no"'},
    )
    assert r.choices[0].message.content in ("yes", "no")


@slow
def test_an_unsupported_schema_keyword_is_a_400_naming_it(server, client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [ASK], "response_format": fmt},
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert '"not"' in err["message"] and err["param"] == "response_format"
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        client.chat.completions.create(model="m", messages=[ASK], tool_choice="required")


def check_call(message) -> str:
    (call,) = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_PARAMS)
    return call.id


@slow
def test_required_tool_call_streamed_and_not(client):
    kw = dict(model="m", messages=[ASK], tools=[WEATHER], max_tokens=64, temperature=0.7)
    r = client.chat.completions.create(tool_choice="required", seed=1, **kw)
    assert r.choices[0].finish_reason == "tool_calls"
    check_call(r.choices[0].message)
    named = {"type": "function", "function": {"name": "get_weather"}}
    fragments = 0
    with client.chat.completions.stream(tool_choice=named, seed=2, **kw) as stream:
        for event in stream:
            fragments += event.type == "tool_calls.function.arguments.delta"
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    check_call(final.choices[0].message)
    assert fragments > 1


@slow
def test_an_agent_continues_after_a_tool_result_from_its_cache(server, client):
    kw = dict(model="m", tools=[WEATHER], temperature=0, extra_body={"agent": "weather"})
    r = client.chat.completions.create(messages=[ASK], tool_choice="required", max_tokens=64, **kw)
    assert r.choices[0].finish_reason == "tool_calls"
    call_id = check_call(r.choices[0].message)
    turn = r.choices[0].message.model_dump(exclude_none=True)
    result = {"role": "tool", "tool_call_id": call_id, "content": "18 degrees, sunny"}
    history = [ASK, turn, result]
    again = client.chat.completions.create(messages=history, max_tokens=6, **kw)
    answer = again.choices[0].message
    assert answer.content and not answer.tool_calls
    # the call turn was read from the cache: all of it but its last token's KV
    covered = r.usage.prompt_tokens + r.usage.completion_tokens - 1
    assert again.usage.prompt_tokens_details.cached_tokens >= covered
    stored = conversation(server, "weather")
    assert [m["role"] for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[1]["tool_calls"][0]["id"] == call_id
    assert stored[1]["tool_calls"][0]["function"] == turn["tool_calls"][0]["function"]
    assert stored[2] == result and stored[3]["content"] == answer.content
