"""The agent handle: a named, long-lived conversation whose KV cache persists."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from edge_infer.agents.images import ImageSource, storable
from edge_infer.agents.state import AgentState
from edge_infer.agents.turn import AgentTurn
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import Usage
from edge_infer.generation.tools import Tool


class AgentHost(Protocol):
    """What a handle asks of the agent manager that made it."""

    def state(self, name: str) -> AgentState: ...

    def usage(self, name: str) -> Usage: ...

    def turn(
        self,
        name: str,
        new_messages: list[dict[str, Any]],
        params: SamplingParams | None,
        kwargs: dict[str, Any],
    ) -> Iterator[str]: ...

    def begin_turn(
        self,
        name: str,
        new_messages: list[dict[str, Any]],
        params: SamplingParams | None,
        kwargs: dict[str, Any],
        keep_messages: int | None = None,
        tools: Sequence[Tool] = (),
        tool_format: str | None = None,
    ) -> AgentTurn: ...

    def append(self, name: str, messages: list[dict[str, Any]], prefill: bool) -> None: ...

    def fork(self, name: str, new_name: str) -> Agent: ...

    def reset(self, name: str) -> None: ...

    def flush(self, name: str | None = None) -> None: ...


class Agent:
    """A named conversation with a persistent KV cache. Get one with :meth:`Engine.agent`."""

    def __init__(self, manager: AgentHost, name: str) -> None:
        self._manager, self.name = manager, name

    @property
    def _state(self) -> AgentState:
        return self._manager.state(self.name)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The conversation the cache holds (a copy)."""
        return [dict(m) for m in self._state.messages]

    @property
    def system(self) -> str | None:
        return self._state.extra.get("system")

    @property
    def usage(self) -> Usage:
        """The last turn's usage: prompt, cached and completion tokens, TTFT, tokens/s."""
        return self._manager.usage(self.name)

    @property
    def tokens(self) -> int:
        """Tokens whose KV the agent holds."""
        return len(self._state.token_ids)

    def chat(
        self,
        content: str | list[dict[str, Any]],
        params: SamplingParams | None = None,
        *,
        images: Sequence[ImageSource] = (),
        **kwargs: Any,
    ) -> str:
        """Add a user message (or a list of messages) and return the reply.

        Only the new turn is prefilled; the conversation so far comes from the cache.
        ``images`` (paths, encoded bytes or PIL images; a VLM only) go before the text.
        """
        return "".join(self.stream(content, params, images=images, **kwargs))

    def stream(
        self,
        content: str | list[dict[str, Any]],
        params: SamplingParams | None = None,
        *,
        images: Sequence[ImageSource] = (),
        **kwargs: Any,
    ) -> Iterator[str]:
        """Like :meth:`chat`, streamed as text pieces. Closing the stream early keeps what
        was generated so far as the reply, in the messages and in the cache."""
        return self._manager.turn(self.name, with_images(content, images), params, kwargs)

    def start_turn(
        self,
        content: str | list[dict[str, Any]],
        params: SamplingParams | None = None,
        *,
        keep_messages: int | None = None,
        tools: Sequence[Tool] = (),
        tool_format: str | None = None,
        **kwargs: Any,
    ) -> AgentTurn:
        """Begin a turn to drive step by step (batched decoding does this); the agent stays
        locked until the turn's ``finish()``. With ``keep_messages`` the new messages follow
        only the first that many stored ones (the rest are replaced). ``tools`` go into the
        prompt; with ``tool_format`` (see :func:`~edge_infer.generation.tools.call_format`)
        the reply's calls are parsed and kept with the assistant message."""
        return self._manager.begin_turn(
            self.name, as_messages(content), params, kwargs, keep_messages, tools, tool_format
        )

    def add_messages(self, messages: list[dict[str, Any]], prefill: bool = True) -> None:
        """Append messages (another agent's output, a tool result...) without a reply.

        With ``prefill`` the cache is extended now, so the next turn starts from it.
        """
        self._manager.append(self.name, messages, prefill)

    def fork(self, name: str) -> Agent:
        """A new agent starting from a copy of this one's conversation and cache."""
        return self._manager.fork(self.name, name)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self._manager.reset(self.name)

    def save(self) -> None:
        """Wait until the agent's cache is on disk."""
        self._manager.flush(self.name)

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, tokens={self.tokens}, messages={len(self._state.messages)})"


def with_images(
    content: str | list[dict[str, Any]], images: Sequence[ImageSource]
) -> list[dict[str, Any]]:
    """``as_messages(content)``, with ``images`` stored (as data: URIs) before a text."""
    if not images:
        return as_messages(content)
    if not isinstance(content, str):
        raise ValueError("images= goes with a text message; put image parts in the messages")
    parts = [storable(i) for i in images] + [{"type": "text", "text": content}]
    return [{"role": "user", "content": parts}]


def as_messages(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A user message from a string, or a copy of a non-empty list of messages."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    messages = [dict(m) for m in content]
    if not messages:
        raise ValueError("no messages given")
    return messages
