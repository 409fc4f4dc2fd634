"""Rendering chat messages into a prompt with a model's Jinja chat template."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = [
    "DEFAULT_CHAT_TEMPLATE",
    "GEMMA_CHAT_TEMPLATE",
    "compile_template",
    "render_chat",
    "render_chat_parts",
    "validate_messages",
]

# ChatML, used when a model ships no template.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's turns (Gemma 2 and 3), for Gemma files that ship no template: the system message
# opens the first user turn, the assistant's role is "model", replies end with <end_of_turn>.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class _GenerationTagExtension(Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` (used by some templates) as a no-op."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message: str) -> None:
    raise ValueError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
    ensure_ascii: bool = False,
) -> str:
    return json.dumps(
        value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii
    )


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols", _GenerationTagExtension],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"invalid chat template (line {exc.lineno}): {exc.message}") from exc


def compile_template(template: str | None) -> jinja2.Template:
    """``template`` (ChatML when None) compiled, once per template; ValueError for an
    invalid one."""
    return _compile(template if template is not None else DEFAULT_CHAT_TEMPLATE)


def validate_messages(messages: Any) -> None:
    """Raise ValueError unless `messages` is a list of dicts with str 'role' and 'content'."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{i}] has no {key!r}")
            if not isinstance(message[key], str):
                raise ValueError(
                    f"messages[{i}][{key!r}] must be a str, got {type(message[key]).__name__}"
                )


def render_chat(
    template: str | None,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> str:
    """Render `messages` with a Jinja chat template (ChatML when `template` is None).

    `extra` is passed to the template as further variables (e.g. ``tools``). Raises ValueError
    for malformed messages, an invalid template, or an error the template raises itself.
    """
    validate_messages(messages)
    compiled = compile_template(template)
    context: dict[str, Any] = dict(extra)
    context.update(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token if bos_token is not None else "",
        eos_token=eos_token if eos_token is not None else "",
    )
    try:
        return compiled.render(**context)
    except jinja2.TemplateError as exc:
        raise ValueError(f"chat template rendering failed: {exc}") from exc


def _strings(value: Any) -> list[str]:
    """Every string in ``value`` (nested dicts, lists and tuples), keys included."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


def _marker(texts: Sequence[str]) -> str:
    """A private-use character that occurs in none of ``texts``."""
    for code in range(0xE000, 0xF900):
        ch = chr(code)
        if not any(ch in t for t in texts):
            return ch
    raise ValueError("no free private-use character to mark special-token text with")


@lru_cache(maxsize=8)
def special_finder(special: tuple[str, ...]) -> re.Pattern[str]:
    """A pattern matching any of the ``special`` token texts, longest first. Compiled once
    per tokenizer: with thousands of special tokens (Gemma has over 6,000) compiling it takes
    a noticeable part of a second."""
    specials = sorted({s for s in special if s}, key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in specials))


def render_chat_parts(
    template: str | None,
    messages: list[dict],
    special: Sequence[str],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> list[tuple[str, bool]]:
    """The rendered prompt as pieces ``(text, is_markup)``: ``is_markup`` pieces are exactly
    one of the ``special`` token texts, written by the template itself; the other pieces are
    text, in which special-token text that came from the messages stays plain text.

    Special-token text in every string of the messages and of ``extra`` (tool definitions,
    tool-call arguments, at any depth) is swapped for placeholders before rendering and
    restored after the prompt is split at the template's own special tokens, so the template
    sees (and transforms) it as text; joining every piece gives exactly what
    :func:`render_chat` gives.
    """
    validate_messages(messages)
    specials = sorted({s for s in special if s}, key=len, reverse=True)
    if not specials:
        text = render_chat(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **extra,
        )
        return [(text, False)] if text else []
    finder = special_finder(tuple(special))
    strings = _strings([messages, extra])
    mark = _marker([*strings, template or DEFAULT_CHAT_TEMPLATE, *specials])
    literal: list[str] = []

    def placeholder_of(match: re.Match) -> str:
        literal.append(match.group(0))
        return f"{mark}{len(literal) - 1}{mark}"

    def hide(value: Any) -> Any:
        if isinstance(value, str):
            return finder.sub(placeholder_of, value)
        if isinstance(value, Mapping):
            return {k: hide(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [hide(v) for v in value]
        return value

    rendered = render_chat(
        template,
        hide(messages),
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
        **hide(extra),
    )
    placeholder = re.compile(f"{re.escape(mark)}([0-9]+){re.escape(mark)}")

    def restore(text: str) -> str:
        return placeholder.sub(lambda m: literal[int(m.group(1))], text)

    parts: list[tuple[str, bool]] = []
    pos = 0
    for m in finder.finditer(rendered):
        if m.start() > pos:
            parts.append((restore(rendered[pos : m.start()]), False))
        parts.append((m.group(0), True))
        pos = m.end()
    if pos < len(rendered):
        parts.append((restore(rendered[pos:]), False))
    return parts
