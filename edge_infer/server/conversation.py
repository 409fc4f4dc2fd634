"""How a request's messages meet an agent's stored conversation."""

from __future__ import annotations

from typing import Any


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("role") == b.get("role") and a.get("content") == b.get("content")


def split_request_messages(
    stored: list[dict[str, Any]], incoming: list[dict[str, Any]]
) -> tuple[str | None, list[dict[str, Any]]]:
    """Split a request for an agent into (system prompt or None, messages new to the agent).

    Clients may send only the new messages, or the whole conversation as OpenAI clients do:
    when ``incoming`` (after its system message) repeats the agent's stored conversation, only
    what follows is new. A leading system message sets the agent's system prompt.
    """
    system = None
    rest = list(incoming)
    if rest and rest[0].get("role") == "system":
        system = str(rest.pop(0).get("content") or "")
    history = stored[1:] if stored and stored[0].get("role") == "system" else list(stored)
    n = len(history)
    if n and len(rest) > n and all(_same(a, b) for a, b in zip(history, rest[:n], strict=True)):
        rest = rest[n:]
    if not rest:
        raise ValueError("the request has no new message for the agent (only a system message)")
    return system, rest
