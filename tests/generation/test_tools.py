"""Tool calls: parsing each family's format, and grammars that only allow valid calls."""

from __future__ import annotations

import json

import jsonschema
import pytest

from edge_infer.errors import GrammarError
from edge_infer.generation.constraint import TokenConstraint
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.tools import (
    Tool,
    call_format,
    call_grammar,
    parse_tool_calls,
    parse_tools,
    prompt_messages,
    tool_prompt,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def test_parse_tools_names_the_bad_entry():
    tools = parse_tools([WEATHER, TIME])
    assert [t.name for t in tools] == ["get_weather", "get_time"]
    assert tools[0].openai() == WEATHER
    for bad, where in (
        ("x", "list"),
        ([{"type": "retrieval"}], "tools[0]"),
        ([{"type": "function", "function": {}}], "tools[0].function"),
        ([WEATHER, WEATHER], "same name"),
    ):
        with pytest.raises(ValueError, match=where.replace("[", r"\[").replace("]", r"\]")):
            parse_tools(bad)


def test_formats_from_templates():
    assert call_format(None) == "hermes"
    assert call_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert call_format("{% if ipython %}<|python_tag|>{% endif %}") == "llama3"
    assert call_format("{% for t in tools %}<tool_call>{% endfor %}") == "hermes"


@pytest.mark.parametrize(
    "fmt, text, rest, calls",
    [
        (
            "hermes",
            'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Lisbon", "unit": "celsius"}}\n</tool_call>',
            "Let me check.",
            [("get_weather", {"city": "Lisbon", "unit": "celsius"})],
        ),
        (
            "hermes",
            '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}'
            "</tool_call>",
            "",
            [("get_time", {}), ("get_weather", {"city": "Oslo"})],
        ),
        ("hermes", "<tool_call>{not json}</tool_call>", None, []),
        ("hermes", "no call here", None, []),
        (
            "llama3",
            '<|python_tag|>{"name": "get_time", "parameters": {"tz": "UTC"}}',
            "",
            [("get_time", {"tz": "UTC"})],
        ),
        ("llama3", 'It is {"name": "x"} maybe', None, []),
        (
            "mistral",
            'Sure [TOOL_CALLS] [{"name": "get_time", "arguments": {}}]',
            "Sure",
            [("get_time", {})],
        ),
        ("mistral", "[TOOL_CALLS] nothing", None, []),
    ],
)
def test_parse_calls(fmt, text, rest, calls):
    got_text, got = parse_tool_calls(text, fmt)
    assert got_text == (text if rest is None else rest)
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert len({c.id for c in got}) == len(got)


def test_the_generic_prompt_lists_every_tool():
    prompt = tool_prompt(parse_tools([WEATHER, TIME]))
    assert "get_weather" in prompt and "get_time" in prompt and "<tool_call>" in prompt


def test_call_grammar_refuses_an_unknown_named_tool():
    with pytest.raises(GrammarError, match="nope"):
        call_grammar(parse_tools([WEATHER]), "hermes", only="nope")


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
def test_grammar_compiles_for_every_format(torch_engine, fmt):
    grammar = call_grammar(parse_tools([WEATHER, TIME]), fmt)
    TokenConstraint(grammar, torch_engine.tokenizer, torch_engine.runner.vocab_size)


@pytest.mark.parametrize("seed", range(3))
def test_even_the_small_model_makes_a_valid_call_under_the_grammar(torch_engine, seed):
    tools = parse_tools([WEATHER])
    messages = [
        {"role": "system", "content": tool_prompt(tools)},
        {"role": "user", "content": "What is the weather like in Paris?"},
    ]
    grammar = call_grammar(tools, "hermes", parallel=False)
    params = SamplingParams(temperature=0.7, seed=seed, max_tokens=80, grammar=grammar)
    text = torch_engine.chat(messages, params)
    rest, calls = parse_tool_calls(text, "hermes")
    assert rest == "" and [c.name for c in calls] == ["get_weather"]
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["function"]["parameters"])


def test_tool_is_plain_data():
    t = Tool("f", "", {"type": "object"})
    assert t.openai()["function"]["name"] == "f"


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "3 C"},
]


@pytest.mark.parametrize("style", ["QWEN2_STYLE", "LLAMA3_STYLE"])
def test_tools_render_as_transformers_renders_them(style):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    from transformers import PreTrainedTokenizerFast

    from edge_infer.models.chat_template import render_chat
    from tests.support import chat_templates

    template = getattr(chat_templates, style)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
        bos_token="<s>",
        eos_token="</s>",
    )
    theirs = hf.apply_chat_template(
        [dict(m, content=m["content"] or "") for m in CONVERSATION],
        tools=[WEATHER],
        chat_template=template,
        tokenize=False,
        add_generation_prompt=True,
    )
    messages, extra = prompt_messages(CONVERSATION, parse_tools([WEATHER]), template)
    ours = render_chat(template, messages, bos_token="<s>", eos_token="</s>", **extra)
    assert ours == theirs
    assert "get_weather" in ours and "3 C" in ours


def test_templates_without_tools_get_the_hermes_form():
    plain = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    messages, extra = prompt_messages(CONVERSATION, parse_tools([WEATHER]), plain)
    assert extra == {}
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.") and "<tools>" in messages[0]["content"]
    _, calls = parse_tool_calls(messages[2]["content"], "hermes")
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]
    assert messages[3]["content"] == "<tool_response>\n3 C\n</tool_response>"


def test_the_runner_renders_a_tool_conversation_on_the_default_model(torch_engine):
    runner = torch_engine.runner
    tools = parse_tools([WEATHER])
    text = runner.render_chat(CONVERSATION, tools=tools)
    assert "<tools>" in text and "<tool_call>" in text and "<tool_response>\n3 C" in text
    assert runner.chat_ids(CONVERSATION, tools=tools) == torch_engine.tokenize(text)
    plain = [{"role": "user", "content": "Hi"}]
    assert runner.chat_ids(plain) == torch_engine.chat_ids(plain)
