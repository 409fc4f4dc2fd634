"""What a request asks of its reply (a grammar, tool calls) and how a reply splits into text
and calls, whole or streamed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from edge_infer.errors import GrammarError
from edge_infer.generation.constraint import Grammar, compact, response_format_grammar
from edge_infer.generation.tools import (
    HERMES_CLOSE,
    HERMES_OPEN,
    MISTRAL_MARK,
    PYTHON_TAG,
    Tool,
    ToolCall,
    call_format,
    call_grammar,
    parse_tools,
)
from edge_infer.models.tokenizer import Tokenizer

# argument text per streamed tool_calls delta
ARGUMENT_FRAGMENT = 16


class RequestError(ValueError):
    """A request field the server cannot honour as sent; ``param`` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class OutputPlan:
    """The tools a prompt lists, the call format replies are parsed in (None: no parsing),
    the grammar the reply must match, and whether a call is required."""

    tools: list[Tool] = field(default_factory=list)
    call_format: str | None = None
    grammar: Grammar | None = None
    requires_call: bool = False


def _choice(tool_choice: Any, tools: list[Tool]) -> tuple[str, str | None]:
    """("auto" | "none" | "required", the named function or None)."""
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise RequestError(
                "tool_choice",
                f"tool_choice {tool_choice!r} is not auto, none, required or "
                '{"type": "function", "function": {"name": ...}}',
            )
        return tool_choice, None
    fn = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
        raise RequestError(
            "tool_choice",
            'tool_choice must name a function: {"type": "function", "function": {"name": ...}}',
        )
    return "required", fn["name"]


def _checked(grammar: Grammar, param: str) -> Grammar:
    try:
        grammar.compiled()
    except GrammarError as exc:
        raise RequestError(param, f"{param}: {exc}") from None
    return grammar


def response_grammar(response_format: Any) -> Grammar | None:
    """The grammar of an OpenAI ``response_format`` (compact JSON), checked up front."""
    if response_format is None:
        return None
    fmt = dict(response_format) if isinstance(response_format, Mapping) else response_format
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if isinstance(spec, Mapping) and isinstance(spec.get("schema"), (Mapping, bool)):
            fmt["json_schema"] = {**spec, "schema": compact(spec["schema"])}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_object":
        fmt = {"type": "json_schema", "json_schema": {"schema": compact({"type": "object"})}}
    try:
        grammar = response_format_grammar(fmt)
    except GrammarError as exc:
        raise RequestError("response_format", f"response_format: {exc}") from None
    return None if grammar is None else _checked(grammar, "response_format")


def plan_output(
    tokenizer: Tokenizer,
    *,
    response_format: Any = None,
    gbnf: str | None = None,
    tools: Any = None,
    tool_choice: Any = None,
    parallel_tool_calls: bool | None = None,
) -> OutputPlan:
    """What a chat request asks of its reply; RequestError names the field at fault."""
    grammar = response_grammar(response_format)
    if gbnf is not None:
        if grammar is not None:
            raise RequestError("grammar", "send grammar or response_format, not both")
        try:
            grammar = _checked(Grammar.gbnf(gbnf), "grammar")
        except GrammarError as exc:
            raise RequestError("grammar", f"grammar: {exc}") from None
    try:
        parsed = parse_tools(tools) if tools is not None else []
    except ValueError as exc:
        raise RequestError("tools", str(exc)) from None
    choice, only = _choice(tool_choice, parsed)
    if choice != "none" and not parsed:
        raise RequestError("tool_choice", f"tool_choice {choice!r} needs tools")
    if choice == "none" or not parsed:
        return OutputPlan(parsed, None, grammar)
    if grammar is not None:
        raise RequestError(
            "tool_choice",
            "a reply cannot both follow response_format/grammar and call tools: send "
            'tool_choice "none" with them',
        )
    fmt = call_format(tokenizer.chat_template)
    if choice == "auto":
        return OutputPlan(parsed, fmt, None)
    special = {
        t: ids[0]
        for t in (HERMES_OPEN, HERMES_CLOSE, MISTRAL_MARK)
        if t in tokenizer.special_texts and len(ids := tokenizer.encode(t, add_bos=False)) == 1
    }
    try:
        forced = call_grammar(parsed, fmt, only, special, parallel=bool(parallel_tool_calls))
    except GrammarError as exc:
        raise RequestError("tool_choice", str(exc)) from None
    return OutputPlan(parsed, fmt, _checked(forced, "tools"), requires_call=True)


class CallSplitter:
    """Streams a reply's plain text while holding back what may be a tool call."""

    def __init__(self, fmt: str | None, requires_call: bool = False) -> None:
        self.fmt = fmt
        self._hold_all = fmt is not None and requires_call
        self._buf = ""
        self.sent = ""  # the text streamed so far
        self._holding = False

    def feed(self, piece: str) -> str:
        """The part of the reply that can be streamed now, as ``piece`` arrives."""
        if self.fmt is None:
            self.sent += piece
            return piece
        self._buf += piece
        if self._hold_all or self._holding:
            return ""
        if self.fmt == "llama3":  # a call is the whole reply: a JSON object
            head = self._buf.lstrip()
            if not head or head.startswith("{") or PYTHON_TAG.startswith(head[: len(PYTHON_TAG)]):
                self._holding = head.startswith(("{", PYTHON_TAG))
                return ""
            self.fmt = None  # plain text: stream it all from here
            out, self._buf = self._buf, ""
            self.sent += out
            return out
        marker = HERMES_OPEN if self.fmt == "hermes" else MISTRAL_MARK
        at = self._buf.find(marker)
        if at >= 0:
            self._holding = True
            out, self._buf = self._buf[:at], self._buf[at:]
        else:
            keep = next(
                (
                    n
                    for n in range(min(len(marker) - 1, len(self._buf)), 0, -1)
                    if marker.startswith(self._buf[-n:])
                ),
                0,
            )
            cut = len(self._buf) - keep
            out, self._buf = self._buf[:cut], self._buf[cut:]
        self.sent += out
        return out

    def rest(self, content: str, calls: list[ToolCall]) -> str:
        """The text still to stream at the end, given the reply's final text and calls."""
        if not calls:
            return content[len(self.sent) :] if content.startswith(self.sent) else self._buf
        return content[len(self.sent) :] if content.startswith(self.sent) else ""


def call_deltas(calls: list[ToolCall]) -> list[list[dict[str, Any]]]:
    """Streamed ``tool_calls`` deltas for ``calls``: each call opens with its index, id and
    name, then its arguments follow in fragments (clients join them by index)."""
    out: list[list[dict[str, Any]]] = []
    for i, c in enumerate(calls):
        out.append(
            [
                {
                    "index": i,
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": ""},
                }
            ]
        )
        args = c.arguments
        for at in range(0, len(args), ARGUMENT_FRAGMENT):
            out.append([{"index": i, "function": {"arguments": args[at : at + ARGUMENT_FRAGMENT]}}])
    return out
