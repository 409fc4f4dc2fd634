"""What the daemon runs for a request: an agent's turn, a turn on a prompt cache, or a
stateless generation; and the deltas (text, log-probabilities) a request is sent."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from edge_infer.agents.images import ImagePrompt
from edge_infer.agents.turn import AgentTurn
from edge_infer.cache_store import InvalidAgentName, validate_agent_name
from edge_infer.engine import Engine
from edge_infer.generation.runner import Runner
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import Generation, Piece, TokenLogprob, Usage
from edge_infer.generation.tools import Tool, ToolCall, parse_tool_calls
from edge_infer.server.conversation import plan_turn, split_system
from edge_infer.server.prefix_pool import PrefixPool, Slot, keyed_ids

PROMPT_CACHE_PREFIX = "prompt-cache"


def agent_task(
    engine: Engine,
    name: str,
    messages: list[dict[str, Any]],
    params: SamplingParams,
    tools: list[Tool] | None = None,
    tool_format: str | None = None,
) -> AgentTurn:
    """Start agent ``name``'s turn for a request's messages (see :func:`plan_turn`), with
    ``tools`` in the prompt and calls parsed in ``tool_format``."""
    agent = engine.agent(name)
    system, rest = split_system(messages)
    if system is not None and system != (agent.system or ""):
        agent = engine.agent(name, system=system)
    keep, new = plan_turn(agent.messages, rest)
    return agent.start_turn(
        new, params, keep_messages=keep, tools=tools or (), tool_format=tool_format
    )


def prefix_task(
    engine: Engine,
    name: str,
    ids: list[int],
    params: SamplingParams,
    tool_format: str | None,
    images: ImagePrompt | None = None,
) -> AgentTurn:
    """A turn on the persistent prefix cache ``name`` (calls parsed in ``tool_format``;
    ``images``: the image prompt ``ids`` come from)."""
    turn = engine.start_prefix_turn(name, ids, params, images)
    turn.tool_format = tool_format
    return turn


def prompt_cache_name(key: str) -> str:
    """The name the cache of a ``prompt_cache_key`` is stored under (as agents are): the key
    itself when it makes a valid name, else a digest of it."""
    try:
        return validate_agent_name(f"{PROMPT_CACHE_PREFIX}.{key}")
    except InvalidAgentName:
        return f"{PROMPT_CACHE_PREFIX}-{hashlib.sha256(key.encode()).hexdigest()[:32]}"


class StatelessTask:
    """A generation on a borrowed prefix cache, given back when it ends, however it ends.

    With ``images`` (the prompt ``ids`` come from) the pool matches image spans by their
    keys, and the image embeddings past the reused prefix are prefilled here."""

    def __init__(
        self,
        runner: Runner,
        pool: PrefixPool,
        ids: list[int],
        params: SamplingParams,
        tool_format: str | None = None,
        images: ImagePrompt | None = None,
    ) -> None:
        runner.check_fits(len(ids))
        self._pool = pool
        self.tool_format = tool_format
        self.pieces: list[str] = []
        self._keyed = keyed_ids(ids, images.images) if images is not None else list(ids)
        slot = pool.acquire(self._keyed)
        try:
            held = slot.cache.length
            if images is not None:
                segments = images.segments_from(held)
                if segments:
                    runner.prefill_segments(segments, slot.cache)
            self.generation = Generation(runner, ids, params, slot.cache, Usage())
            if images is not None:
                usage = self.generation.usage
                usage.cached_tokens = held
                usage.image_tokens = images.image_tokens
                usage.image_tokens_total = images.image_tokens_total
        except BaseException:
            pool.release(slot, slot.token_ids)  # untouched: it holds what it held
            raise
        self._slot: Slot | None = slot

    def record(self, pieces: list[Piece]) -> list[str]:
        texts = [text for _, text in pieces if text]
        self.pieces += texts
        return texts

    def reply(self) -> tuple[str, list[ToolCall]]:
        """(the reply's text outside tool calls, the calls it makes)."""
        text = "".join(self.pieces)
        return parse_tool_calls(text, self.tool_format) if self.tool_format else (text, [])

    def finish(self) -> Usage:
        """Stop the generation and give the cache back with the ids whose KV it holds."""
        gen = self.generation
        gen.cancel()
        if self._slot is not None:
            slot, self._slot = self._slot, None
            self._pool.release(slot, self._keyed + gen.generated)
        return gen.usage


class Inner(Protocol):
    """A stateless task or an agent's turn."""

    generation: Generation
    pieces: list[str]

    def record(self, pieces: list[Piece]) -> list[str]: ...

    def reply(self) -> tuple[str, list[ToolCall]]: ...

    def finish(self) -> Usage: ...


@dataclass
class Delta:
    """What one step adds to a reply: text, and the log-probabilities of its tokens."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Reply:
    """A request's task, its output as :class:`Delta` s (with log-probabilities when the
    request asked for them: ``top`` alternatives per token)."""

    def __init__(self, inner: Inner, top: int | None = None) -> None:
        self.inner = inner
        self.generation = inner.generation
        self.top = top
        self._seen = 0  # generated tokens already given out
        if top is not None:
            self.generation.keep_logprobs(top)

    def record(self, pieces: list[Piece]) -> list[Delta]:
        self.inner.record(pieces)  # the turn keeps its reply
        kept = self.generation.logprobs
        out = []
        for token, text in pieces:
            entries = []
            if token is not None:
                if kept is not None:
                    entries = [kept[self._seen]]
                self._seen += 1
            if text or entries:
                out.append(Delta(text, entries))
        return out

    def reply(self) -> tuple[str, list[ToolCall]]:
        """The finished reply: its text outside tool calls, and the calls."""
        return self.inner.reply()

    def stopped_by(self, stops: tuple[str, ...]) -> str | None:
        """The stop string that ended the reply, if one did."""
        gen = self.generation
        if not stops or gen.usage.finish_reason != "stop":
            return None
        text = "".join(self.inner.pieces)
        full = gen.runner.tokenizer.decode(gen.generated)
        tail = full[len(text) :] if full.startswith(text) else ""
        return next((s for s in stops if tail.startswith(s)), None)

    def finish(self) -> Usage:
        return self.inner.finish()
