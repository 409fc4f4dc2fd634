"""Grammar-constrained decoding on the default model: JSON schemas, regexes, batches, agents."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pydantic
import pytest

from edge_infer.errors import GrammarError
from edge_infer.generation.batch import decode_together
from edge_infer.generation.constraint import (
    Grammar,
    TokenConstraint,
    response_format_grammar,
    schema_grammar,
)
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import Generation, Usage

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
ASK = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_response_formats_map_to_grammars():
    assert response_format_grammar(None) is None
    assert response_format_grammar({"type": "text"}) is None
    assert response_format_grammar({"type": "json_object"}) == Grammar.json_object()
    wrapped = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    assert response_format_grammar(wrapped) == Grammar.json_schema(PERSON)
    assert json.loads(response_format_grammar(Person).text)["required"] == ["name", "age"]
    assert schema_grammar(json.dumps(PERSON)) == Grammar("json_schema", json.dumps(PERSON))
    for bad in ({"type": "yaml"}, {"type": "json_schema"}, 42):
        with pytest.raises(GrammarError):
            response_format_grammar(bad)


def test_an_unsupported_schema_keyword_is_named():
    with pytest.raises(GrammarError, match=r"\$dynamicRef"):
        Grammar.json_schema({"type": "object", "$dynamicRef": "#node"}).compiled()
    with pytest.raises(GrammarError, match="not valid JSON"):
        Grammar.json_schema("{not json")
    with pytest.raises(GrammarError, match="format"):
        Grammar("yaml", "a: 1")


def test_the_mask_allows_only_what_the_grammar_can_continue_with(torch_engine):
    tok = torch_engine.tokenizer
    c = TokenConstraint(Grammar.json_schema(PERSON), tok, torch_engine.runner.vocab_size)
    first = {tok.decode([i]) for i in np.flatnonzero(c.allowed())}
    assert first and all(t.lstrip().startswith("{") for t in first)
    logits = np.zeros(torch_engine.runner.vocab_size, dtype=np.float32)
    masked = c.apply(logits)
    assert np.isneginf(masked).sum() == len(masked) - len(first)


@pytest.mark.parametrize("seed", range(5))
def test_sampled_json_validates_against_the_schema(torch_engine, seed):
    out = torch_engine.chat(ASK, json_schema=PERSON, temperature=0.7, seed=seed, max_tokens=64)
    jsonschema.validate(json.loads(out), PERSON)
    assert torch_engine.last_usage.finish_reason == "stop"


def test_regex_and_pydantic_model(torch_engine):
    colour = Grammar("regex", "(red|green|blue)")
    out = torch_engine.generate("My favourite colour is", grammar=colour, temperature=0)
    assert out in {"red", "green", "blue"}
    person = torch_engine.chat(ASK, response_format=Person, temperature=0, max_tokens=64)
    Person.model_validate_json(person)


def test_batched_sequences_each_follow_their_own_grammar(torch_engine):
    runner = torch_engine.runner
    asks = [ASK, [{"role": "user", "content": "Name a fruit."}]] * 2
    params = [
        SamplingParams(temperature=0, max_tokens=40, grammar=Grammar.json_schema(PERSON)),
        SamplingParams(temperature=0, max_tokens=12),
        SamplingParams(temperature=0, max_tokens=40),
        SamplingParams(temperature=0, max_tokens=12, grammar=Grammar("regex", "[a-z]+ [a-z]+")),
    ]

    def generations():
        return [
            Generation(runner, torch_engine.chat_ids(a), p, runner.new_cache(), Usage())
            for a, p in zip(asks, params, strict=True)
        ]

    alone = []
    for g in generations():
        alone.append(runner.tokenizer.decode([t for t, _ in g.run() if t is not None]))
    gens = generations()
    for _ in decode_together(runner, gens):
        pass
    together = [runner.tokenizer.decode(g.generated) for g in gens]
    assert together == alone
    jsonschema.validate(json.loads(together[0]), PERSON)
    assert len(together[3].split(" ")) == 2


def test_an_agent_answers_in_json_and_keeps_its_cache(torch_engine, tmp_path, monkeypatch):
    from edge_infer.engine import Engine

    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path))
    eng = Engine(torch_engine.model, torch_engine.backend)
    agent = eng.agent("json")
    out = agent.chat(ASK[0]["content"], json_schema=PERSON, temperature=0, max_tokens=64)
    jsonschema.validate(json.loads(out), PERSON)
    agent.chat("Thanks!", temperature=0, max_tokens=4)
    assert agent.usage.cached_tokens > 0
    assert agent.messages[-3]["content"] == out
