"""Tool calling: tool specs, each model family's call format, parsing calls, call grammars."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edge_infer.errors import GrammarError
from edge_infer.generation.constraint import Grammar, compact

# The formats models write calls in. "hermes" (Qwen, Hermes, and our generic prompt):
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>; "llama3": a bare JSON object
# {"name": ..., "parameters": {...}} (after <|python_tag|> for some); "mistral":
# [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...].
FORMATS = ("hermes", "llama3", "mistral")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_MARK = "[TOOL_CALLS]"
PYTHON_TAG = "<|python_tag|>"


@dataclass(frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and a JSON schema of arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]

    def openai(self) -> dict[str, Any]:
        """The OpenAI ``tools`` entry, as chat templates expect it."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: an id, the function's name and its arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def parse_tools(tools: Any) -> list[Tool]:
    """Tools from OpenAI's ``tools`` list; ValueError names the entry at fault."""
    if not isinstance(tools, list):
        raise ValueError("tools must be a list")
    out: list[Tool] = []
    for i, entry in enumerate(tools):
        fn = entry.get("function") if isinstance(entry, Mapping) else None
        if not isinstance(entry, Mapping) or entry.get("type", "function") != "function":
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}].function needs a name")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, Mapping):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append(Tool(fn["name"], str(fn.get("description") or ""), params))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError("tools: two functions have the same name")
    return out


def call_format(chat_template: str | None) -> str:
    """The call format a chat template teaches its model ("hermes" when it says nothing)."""
    t = chat_template or ""
    if MISTRAL_MARK in t:
        return "mistral"
    if PYTHON_TAG in t or "ipython" in t:
        return "llama3"
    return "hermes"


def template_renders_tools(chat_template: str | None) -> bool:
    """Whether the template itself puts ``tools`` into the prompt."""
    return bool(chat_template) and re.search(r"\btools\b", chat_template or "") is not None


def tool_prompt(tools: Sequence[Tool]) -> str:
    """A system prompt that teaches the hermes format, for templates without tool support."""
    listing = "\n".join(json.dumps(t.openai()["function"]) for t in tools)
    return (
        "You can call functions. The functions, as JSON schemas:\n"
        f"<tools>\n{listing}\n</tools>\n"
        "To call one, answer with exactly:\n"
        f'{HERMES_OPEN}\n{{"name": <function name>, "arguments": <arguments object>}}\n'
        f"{HERMES_CLOSE}"
    )


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _call(name: Any, arguments: Any) -> ToolCall | None:
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, Mapping):
        return None
    return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


def _json_values(text: str) -> list[tuple[int, int, Any]]:
    """Every top-level JSON value in ``text`` that starts with '{' or '[': (start, end, value)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except ValueError:
                i += 1
                continue
            out.append((i, end, value))
            i = end
        else:
            i += 1
    return out


def parse_tool_calls(text: str, fmt: str) -> tuple[str, list[ToolCall]]:
    """Split a reply into its plain text and the calls it makes in format ``fmt``.

    Text that only looks like a call (unbalanced tags, JSON that is not a call) stays text.
    """
    if fmt == "hermes":
        calls, kept, pos = [], [], 0
        pattern = re.compile(re.escape(HERMES_OPEN) + r"(.*?)" + re.escape(HERMES_CLOSE), re.S)
        for m in pattern.finditer(text):
            try:
                obj = json.loads(m.group(1))
            except ValueError:
                continue
            call = _call(obj.get("name"), obj.get("arguments")) if isinstance(obj, dict) else None
            if call is None:
                continue
            calls.append(call)
            kept.append(text[pos : m.start()])
            pos = m.end()
        kept.append(text[pos:])
        return ("".join(kept).strip() if calls else text), calls
    if fmt == "mistral":
        at = text.find(MISTRAL_MARK)
        if at < 0:
            return text, []
        values = _json_values(text[at + len(MISTRAL_MARK) :])
        if not values or not isinstance(values[0][2], list):
            return text, []
        calls = [
            c
            for obj in values[0][2]
            if isinstance(obj, dict) and (c := _call(obj.get("name"), obj.get("arguments")))
        ]
        return (text[:at].strip(), calls) if calls else (text, [])
    if fmt == "llama3":
        body = text.replace(PYTHON_TAG, "")
        stripped = body.strip()
        values = _json_values(stripped)
        if len(values) != 1 or values[0][0] != 0 or values[0][1] != len(stripped):
            return text, []  # a call is the whole reply
        obj = values[0][2]
        if not isinstance(obj, dict):
            return text, []
        call = _call(obj.get("name"), obj.get("parameters", obj.get("arguments")))
        return ("", [call]) if call else (text, [])
    raise ValueError(f"unknown tool-call format {fmt!r} (one of {FORMATS})")


def call_grammar(
    tools: Sequence[Tool],
    fmt: str,
    only: str | None = None,
    special: Mapping[str, int] | None = None,
    parallel: bool = True,
) -> Grammar:
    """A grammar whose every output is valid calls of ``tools`` (of ``only``) in format
    ``fmt``: one, or with ``parallel`` one or more. ``special`` maps marker strings that are
    single special tokens to their ids."""
    chosen = [t for t in tools if only is None or t.name == only]
    if not chosen:
        raise GrammarError(f"tool_choice names {only!r}, which is not among the tools")
    key = "parameters" if fmt == "llama3" else "arguments"
    one = {
        "oneOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t.name}, key: dict(t.parameters)},
                "required": ["name", key],
                "additionalProperties": False,
            }
            for t in chosen
        ]
    }

    def lit(text: str) -> str:  # a marker that is one special token is matched as that token
        return f"<[{special[text]}]>" if special and text in special else json.dumps(text)

    if fmt == "hermes":
        start = 'start: call ("\\n" call)*\n' if parallel else "start: call\n"
        rules = start + f'call: {lit(HERMES_OPEN)} "\\n" obj "\\n" {lit(HERMES_CLOSE)}\n'
    elif fmt == "mistral":
        one = {"type": "array", "items": one, "minItems": 1}
        if not parallel:
            one["maxItems"] = 1
        rules = f"start: {lit(MISTRAL_MARK)} obj\n"
    elif fmt == "llama3":
        rules = "start: obj\n"
    else:
        raise ValueError(f"unknown tool-call format {fmt!r} (one of {FORMATS})")
    # written as the hermes fallback re-renders a stored call, so the KV of the call is reused
    return Grammar("lark", rules + "obj: %json " + json.dumps(compact(one)))


def _renders(chat_template: str | None, *words: str) -> bool:
    t = chat_template or ""
    return any(w in t for w in words)


def prompt_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Tool],
    chat_template: str | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Messages (and template variables) that put ``tools``, earlier calls and tool results
    into the prompt: the template's own way where it has one, else the hermes format (a
    system prompt listing the tools, calls as ``<tool_call>`` text, results as user turns).
    """
    extra: dict[str, Any] = {}
    out = [dict(m) for m in messages]
    if tools:
        if template_renders_tools(chat_template):
            extra["tools"] = [t.openai() for t in tools]
        else:
            listing = tool_prompt(tools)
            if out and out[0].get("role") == "system":
                out[0]["content"] = f"{out[0].get('content') or ''}\n\n{listing}".lstrip()
            else:
                out.insert(0, {"role": "system", "content": listing})
    calls_native = _renders(chat_template, "tool_calls")
    results_native = _renders(chat_template, '"tool"', "'tool'")
    fixed: list[dict[str, Any]] = []
    for m in out:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            if calls_native:
                m["content"] = m.get("content") or ""
            else:
                text = [m["content"]] if m.get("content") else []
                for c in m["tool_calls"]:
                    fn = c.get("function", {})
                    args = fn.get("arguments", "{}")
                    body = {"name": fn.get("name"), "arguments": json.loads(args or "{}")}
                    text.append(f"{HERMES_OPEN}\n{json.dumps(body)}\n{HERMES_CLOSE}")
                m = {"role": "assistant", "content": "\n".join(text)}
        elif m.get("role") == "tool" and not results_native:
            m = {
                "role": "user",
                "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>",
            }
        fixed.append(m)
    return fixed, extra
