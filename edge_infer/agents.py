"""Agents: named, long-lived conversations whose KV caches persist between turns and runs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edge_infer.cache_store import KVBlock
from edge_infer.errors import ContextLengthError
from edge_infer.sampling import SamplingParams

if TYPE_CHECKING:
    from edge_infer.agent_manager import AgentManager
    from edge_infer.agent_turn import AgentTurn
    from edge_infer.engine import Usage

OVERFLOW_POLICIES = ("error", "drop_oldest")


@dataclass
class AgentInfo:
    """One agent as listed by :meth:`Engine.agents`."""

    name: str
    tokens: int
    bytes_in_memory: int
    bytes_on_disk: int
    last_used: float
    messages: int


@dataclass
class _State:
    """What the engine holds for one agent between turns."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)  # ids the blocks/cache hold
    blocks: list[KVBlock] = field(default_factory=list)  # exported form of the cache
    cache: Any = None  # live backend cache (hot), or None
    last_used: float = 0.0
    busy: int = 0  # turns in progress (guarded by ``lock``)
    lock: threading.RLock = field(default_factory=threading.RLock)


class Agent:
    """A named conversation with a persistent KV cache. Get one with :meth:`Engine.agent`."""

    def __init__(self, manager: AgentManager, name: str) -> None:
        self._engine, self.name = manager, name

    @property
    def _state(self) -> _State:
        return self._engine.state(self.name)

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
        return self._engine.usage(self.name)

    @property
    def tokens(self) -> int:
        """Tokens whose KV the agent holds."""
        return len(self._state.token_ids)

    def chat(
        self,
        content: str | list[dict[str, Any]],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> str:
        """Add a user message (or a list of messages) and return the reply.

        Only the new turn is prefilled; the conversation so far comes from the cache.
        """
        return "".join(self.stream(content, params, **kwargs))

    def stream(
        self,
        content: str | list[dict[str, Any]],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """Like :meth:`chat`, streamed as text pieces. Closing the stream early keeps what
        was generated so far as the reply, in the messages and in the cache."""
        return self._engine.turn(self.name, as_messages(content), params, kwargs)

    def start_turn(
        self,
        content: str | list[dict[str, Any]],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> AgentTurn:
        """Begin a turn to drive step by step (batched decoding does this); the agent stays
        locked until the turn's ``finish()``."""
        return self._engine.begin_turn(self.name, as_messages(content), params, kwargs)

    def add_messages(self, messages: list[dict[str, Any]], prefill: bool = True) -> None:
        """Append messages (another agent's output, a tool result...) without a reply.

        With ``prefill`` the cache is extended now, so the next turn starts from it.
        """
        self._engine.append(self.name, messages, prefill)

    def fork(self, name: str) -> Agent:
        """A new agent starting from a copy of this one's conversation and cache."""
        return self._engine.fork(self.name, name)

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self._engine.reset(self.name)

    def save(self) -> None:
        """Wait until the agent's cache is on disk."""
        self._engine.flush(self.name)

    def __repr__(self) -> str:
        return f"Agent({self.name!r}, tokens={self.tokens}, messages={len(self._state.messages)})"


def as_messages(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A user message from a string, or a copy of a non-empty list of messages."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    messages = [dict(m) for m in content]
    if not messages:
        raise ValueError("no messages given")
    return messages


def fit_messages(
    render: Any, messages: list[dict[str, Any]], limit: int, policy: str
) -> tuple[list[dict[str, Any]], list[int]]:
    """Drop the oldest turns after the system prompt until the rendered ids fit ``limit``."""
    ids = render(messages)
    if len(ids) < limit:
        return messages, ids
    if policy != "drop_oldest":
        raise ContextLengthError(
            f"the conversation needs {len(ids)} tokens but the model's context is {limit} "
            "(to drop the oldest turns instead: overflow='drop_oldest' in Python, "
            "--drop-oldest for edge-infer chat, or /reset)"
        )
    head = 1 if messages and messages[0]["role"] == "system" else 0
    kept = list(messages)
    while len(ids) >= limit and len(kept) - head > 1:
        del kept[head]
        ids = render(kept)
    if len(ids) >= limit:
        raise ContextLengthError(
            f"the last message alone needs {len(ids)} tokens; the model's context is {limit}"
        )
    return kept, ids
