"""How a request's messages meet an agent's stored conversation."""

from __future__ import annotations

from typing import Any

# What makes two messages the same message (content, and the tool-call fields kept with it).
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")


def same_message(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in MESSAGE_KEYS)


def split_system(incoming: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(the leading system message's text or None, the other messages)."""
    if incoming and incoming[0].get("role") == "system":
        return str(incoming[0].get("content") or ""), list(incoming[1:])
    return None, list(incoming)


def plan_turn(
    stored: list[dict[str, Any]], incoming: list[dict[str, Any]]
) -> tuple[int, list[dict[str, Any]]]:
    """(stored messages to keep, messages to add after them) for a request to an agent.

    ``stored`` is the agent's conversation (its system message first, if any); ``incoming``
    the request's messages without their leading system message. A request either sends
    only new messages, appended to the conversation, or the whole history, as OpenAI
    clients do. It is the whole history when it starts with the conversation's first
    message (after the system one); then the history sent becomes the conversation: what
    follows the stored messages is added, and from the first message that differs (a
    regenerated answer, an edited turn) the sent messages replace the stored ones. Nothing
    is ever added twice; a message equal to the conversation's first one is only appended
    when the whole history is sent.
    """
    if not incoming:
        raise ValueError("the request has no message for the agent (only a system message)")
    head = 1 if stored and stored[0].get("role") == "system" else 0
    history = stored[head:]
    if not history or not same_message(history[0], incoming[0]):
        return len(stored), incoming
    shared = 0
    for old, new in zip(history, incoming, strict=False):
        if not same_message(old, new):
            break
        shared += 1
    # at least one message is sent again, so the turn has something to answer: a history
    # repeated in full (or cut short, to regenerate) ends with its last message re-added
    shared = min(shared, len(incoming) - 1)
    return head + shared, incoming[shared:]
