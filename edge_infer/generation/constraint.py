"""Grammar-constrained decoding: which tokens a JSON schema, regex or Lark grammar allows next."""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
from llguidance.gbnf_to_lark import gbnf_to_lark
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from edge_infer.errors import GrammarError
from edge_infer.models.tokenizer import Tokenizer

FORMATS = ("json_schema", "regex", "lark")


@dataclass(frozen=True)
class Grammar:
    """What the output must match: a JSON schema (as JSON text), a regex or a Lark grammar."""

    format: str
    text: str

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise GrammarError(f"grammar format must be one of {FORMATS} (got {self.format!r})")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str | bool) -> Grammar:
        """Output that is JSON valid against ``schema`` (a dict, JSON text, or True for any)."""
        if isinstance(schema, str):
            try:
                json.loads(schema)
            except ValueError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from None
            return cls("json_schema", schema)
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def gbnf(cls, text: str) -> Grammar:
        """A grammar in llama.cpp's GBNF (converted to llguidance's Lark form)."""
        try:
            return cls("lark", gbnf_to_lark(text))
        except Exception as exc:  # GbnfToLarkError, or a bare Exception (no root rule)
            raise GrammarError(f"unsupported GBNF grammar: {exc}") from None

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object."""
        return cls.json_schema({"type": "object"})

    def compiled(self) -> str:
        """The grammar in llguidance's form; GrammarError names what it cannot handle."""
        try:
            if self.format == "json_schema":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(self.text)
            elif self.format == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(self.text)
            else:
                grammar = llguidance.LLMatcher.grammar_from_lark(self.text)
        except ValueError as exc:  # llguidance's word for a schema it cannot read
            raise GrammarError(f"unsupported {self.format.replace('_', ' ')}: {exc}") from None
        problem = llguidance.LLMatcher.validate_grammar(grammar)
        if problem:
            raise GrammarError(f"unsupported {self.format.replace('_', ' ')}: {problem}")
        return grammar


# llguidance's JSON options: one way to write the whitespace (json.dumps' separators), so a
# small model cannot wander off into indentation, and a reply reads as its re-rendering does
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def compact(schema: Mapping[str, Any] | bool) -> dict[str, Any]:
    """``schema`` with JSON written one way (``json.dumps``' separators, no extra spaces)."""
    out = {} if schema is True else dict(schema) if isinstance(schema, Mapping) else None
    if out is None:
        raise GrammarError("a JSON schema must be an object or true")
    out.setdefault("x-guidance", COMPACT_JSON)
    return out


def _pydantic_schema(model: Any) -> dict[str, Any] | None:
    """The JSON schema of a pydantic model class, or None for anything else."""
    schema_of = getattr(model, "model_json_schema", None)  # pydantic's API, not ours
    return schema_of() if isinstance(model, type) and callable(schema_of) else None


def schema_grammar(schema: Any) -> Grammar:
    """A JSON-schema grammar from a dict, JSON text, True (any JSON) or a pydantic model."""
    from_model = _pydantic_schema(schema)
    if from_model is not None:
        return Grammar.json_schema(from_model)
    if not isinstance(schema, (Mapping, str, bool)):
        raise GrammarError(f"a JSON schema must be a dict or JSON text (got {type(schema)})")
    return Grammar.json_schema(schema)


def response_format_grammar(response_format: Any) -> Grammar | None:
    """The grammar an OpenAI-style ``response_format`` asks for (None for plain text).

    Accepts ``{"type": "text" | "json_object"}``, ``{"type": "json_schema", "json_schema":
    {"schema": {...}}}``, or a pydantic model class.
    """
    if response_format is None:
        return None
    from_model = _pydantic_schema(response_format)
    if from_model is not None:
        return Grammar.json_schema(from_model)
    if not isinstance(response_format, Mapping):
        raise GrammarError(
            f"response_format must be a dict or a pydantic model (got {type(response_format)})"
        )
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise GrammarError("response_format json_schema needs {'json_schema': {'schema': ...}}")
        return schema_grammar(spec["schema"])
    raise GrammarError(f"unknown response_format type {kind!r} (text, json_object, json_schema)")


class _Vocabulary:
    """Our tokenizer as llguidance reads it: bytes per token id, and text to ids."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self.tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.special_token_ids = sorted(tokenizer.special_ids)
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_bos=False)


_vocabularies: weakref.WeakKeyDictionary[Tokenizer, dict[int, Any]] = weakref.WeakKeyDictionary()
_vocabularies_lock = threading.Lock()


def vocabulary(tokenizer: Tokenizer, n_vocab: int) -> Any:
    """llguidance's tokenizer for ``tokenizer`` over ``n_vocab`` logits (built once, ~0.2 s)."""
    with _vocabularies_lock:
        per_size = _vocabularies.setdefault(tokenizer, {})
        built = per_size.get(n_vocab)
        if built is None:
            wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokenizer))
            built = per_size[n_vocab] = llguidance.LLTokenizer(wrapper, n_vocab=n_vocab)
        return built


class TokenConstraint:
    """One sequence's grammar state: masks the logits, then follows each sampled token."""

    def __init__(self, grammar: Grammar, tokenizer: Tokenizer, n_vocab: int) -> None:
        vocab = vocabulary(tokenizer, n_vocab)
        self._matcher = llguidance.LLMatcher(vocab, grammar.compiled(), log_level=0)
        if self._matcher.is_error():
            raise GrammarError(f"unsupported grammar: {self._matcher.get_error()}")
        self._mask = allocate_token_bitmask(1, vocab.vocab_size)
        self._n_vocab = n_vocab

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more."""
        return self._matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        """Boolean [n_vocab]: the tokens that keep the output inside the grammar."""
        fill_next_token_bitmask(self._matcher, self._mask)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")
        return bits[: self._n_vocab].astype(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids at -inf (a copy)."""
        return np.where(self.allowed(), np.asarray(logits, dtype=np.float32), -np.inf)

    def accept(self, token: int) -> None:
        """Advance past ``token`` (which :meth:`apply` allowed)."""
        if not self._matcher.consume_token(token) or self._matcher.is_error():
            raise GrammarError(f"token {token} broke the grammar: {self._matcher.get_error()}")
