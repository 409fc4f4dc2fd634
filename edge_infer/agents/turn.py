"""One agent's turn in progress, driven alone or as part of a batch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any, Protocol

from edge_infer.agents.state import AgentState
from edge_infer.backends.base import KVCache
from edge_infer.generation.sequence import Generation, Piece, Usage
from edge_infer.generation.tools import ToolCall, parse_tool_calls


class TurnOwner(Protocol):
    """Who records a finished turn (the agent manager)."""

    def end_turn(self, turn: AgentTurn) -> None:
        """Keep the turn's reply and cache in the agent's state and persist them."""
        ...


class AgentTurn:
    """Holds the agent's locks from the start of a turn until :meth:`finish`.

    Whoever drives the turn calls :meth:`sample` (and feeds ``generation``) until
    ``generation.finished``, then :meth:`finish`; finishing early keeps what was generated
    as the reply, in the messages and in the cache.
    """

    def __init__(
        self,
        owner: TurnOwner,
        name: str,
        state: AgentState,
        generation: Generation,
        messages: list[dict[str, Any]] | None,
        first_changed: int,
        locks: ExitStack,
        tool_format: str | None = None,
    ) -> None:
        self.name = name
        self.state = state
        self.generation = generation
        # the conversation the prompt renders, before the reply (None: a cache without one)
        self.messages = messages
        self.first_changed = first_changed  # the cache was cut to this many tokens
        self.pieces: list[str] = []
        self.tool_format = tool_format  # the format tool calls in the reply are parsed in
        self._owner = owner
        self._locks = locks
        self._reply: tuple[str, list[ToolCall]] | None = None
        self.closed = False

    @property
    def cache(self) -> KVCache:
        return self.generation.cache

    @property
    def usage(self) -> Usage:
        return self.generation.usage

    @property
    def text(self) -> str:
        """The reply so far."""
        return "".join(self.pieces)

    def reply(self) -> tuple[str, list[ToolCall]]:
        """The finished reply as (its text outside tool calls, the calls it makes); the
        calls get their ids once, so the stored conversation and the client agree."""
        if self._reply is not None:
            return self._reply
        reply: tuple[str, list[ToolCall]] = (self.text, [])
        if self.tool_format is not None:
            reply = parse_tool_calls(self.text, self.tool_format)
        if self.closed:  # the text is final
            self._reply = reply
        return reply

    def message(self) -> dict[str, Any]:
        """The reply as the assistant message the conversation keeps."""
        text, calls = self.reply()
        out: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            out["tool_calls"] = [c.openai() for c in calls]
        return out

    def record(self, pieces: list[Piece]) -> list[str]:
        """Keep the text of ``pieces`` (from ``generation``) as part of the reply."""
        texts = [text for _, text in pieces if text]
        self.pieces += texts
        return texts

    def sample(self) -> list[str]:
        """Sample the next token; the reply text it adds."""
        return self.record(self.generation.sample())

    def stream(self) -> Iterator[str]:
        """Run the turn alone to the end (then finish it), yielding text pieces."""
        try:
            for _, text in self.generation.run():
                if text:
                    self.pieces.append(text)
                    yield text
        finally:
            self.finish()

    def finish(self) -> Usage:
        """Record the reply and the cache, persist them, release the agent (idempotent)."""
        if not self.closed:
            self.closed = True
            try:
                self.generation.cancel()
                self._owner.end_turn(self)
            finally:
                self._locks.close()
        return self.usage

    def __enter__(self) -> AgentTurn:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()
