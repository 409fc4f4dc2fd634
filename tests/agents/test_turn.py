"""Agents' turns driven together: each keeps its own grammar, and its reply and tool calls."""

from __future__ import annotations

import json

import jsonschema

from edge_infer.generation.batch import decode_together
from edge_infer.generation.constraint import compact
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.tools import call_format, call_grammar, parse_tools

CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000000},
    },
    "required": ["name", "population"],
    "additionalProperties": False,
}
ANSWER = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}
ASKS = [
    ("plain-a", "Name a colour.", None),
    ("json-a", "Describe a city.", CITY),
    ("plain-b", "Count to three.", None),
    ("json-b", "Is water wet?", ANSWER),
]
GREEDY = SamplingParams(max_tokens=32, temperature=0)


def params(schema):
    return (
        GREEDY
        if schema is None
        else SamplingParams.from_kwargs(GREEDY, json_schema=compact(schema))
    )


def test_batched_turns_each_follow_their_own_schema(torch_engine):
    turns = [
        torch_engine.agent(f"batched-{name}").start_turn(ask, params(schema))
        for name, ask, schema in ASKS
    ]
    try:
        for i, pieces in decode_together(torch_engine.runner, [t.generation for t in turns]):
            turns[i].record(pieces)
    finally:
        for t in turns:
            t.finish()
    batched = [t.text for t in turns]
    alone = [
        torch_engine.agent(f"alone-{name}").chat(ask, params(schema)) for name, ask, schema in ASKS
    ]
    assert batched == alone
    for (_, _, schema), text in zip(ASKS, batched, strict=True):
        if schema is not None:
            jsonschema.validate(json.loads(text), schema)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def test_a_tool_call_turn_is_kept_and_its_result_extends_the_cache(torch_engine):
    tools = parse_tools([WEATHER])
    fmt = call_format(torch_engine.tokenizer.chat_template)
    forced = SamplingParams.from_kwargs(
        GREEDY, max_tokens=40, grammar=call_grammar(tools, fmt, parallel=False)
    )
    agent = torch_engine.agent("caller")
    ask = {"role": "user", "content": "Weather in Rome?"}
    with agent.start_turn([ask], forced, tools=tools, tool_format=fmt) as turn:
        for _ in turn.stream():
            pass
    text, (call,) = turn.reply()
    assert text == "" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    held = agent.tokens
    assert agent.messages[-1] == {"role": "assistant", "content": "", "tool_calls": [call.openai()]}
    result = {"role": "tool", "tool_call_id": call.id, "content": "21 C"}
    with agent.start_turn([result], GREEDY, tools=tools, tool_format=fmt) as turn:
        answer = "".join(turn.stream())
    assert turn.usage.cached_tokens >= held  # the call turn was not prefilled again
    assert agent.messages[-2:] == [result, {"role": "assistant", "content": answer}]
