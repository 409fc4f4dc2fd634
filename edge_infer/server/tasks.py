"""What the daemon runs for a request: an agent's turn, or a stateless generation."""

from __future__ import annotations

from typing import Any

from edge_infer.agents.turn import AgentTurn
from edge_infer.engine import Engine
from edge_infer.generation.runner import Runner
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import Generation, Piece, Usage
from edge_infer.server.conversation import split_request_messages
from edge_infer.server.prefix_pool import PrefixPool, Slot


def agent_task(
    engine: Engine, name: str, messages: list[dict[str, Any]], params: SamplingParams
) -> AgentTurn:
    """Start agent ``name``'s turn for a request's messages (history sent again is skipped)."""
    agent = engine.agent(name)
    system, new = split_request_messages(agent.messages, messages)
    if system is not None and system != (agent.system or ""):
        agent = engine.agent(name, system=system)
    return agent.start_turn(new, params)


class StatelessTask:
    """A generation on a borrowed prefix cache, given back when it ends, however it ends."""

    def __init__(
        self, runner: Runner, pool: PrefixPool, ids: list[int], params: SamplingParams
    ) -> None:
        runner.check_fits(len(ids))
        self._pool = pool
        slot = pool.acquire(ids)
        try:
            self.generation = Generation(runner, ids, params, slot.cache, Usage())
        except BaseException:
            pool.release(slot, slot.token_ids)  # untouched: it holds what it held
            raise
        self._slot: Slot | None = slot

    def record(self, pieces: list[Piece]) -> list[str]:
        return [text for _, text in pieces if text]

    def finish(self) -> Usage:
        """Stop the generation and give the cache back with the ids whose KV it holds."""
        gen = self.generation
        gen.cancel()
        if self._slot is not None:
            slot, self._slot = self._slot, None
            self._pool.release(slot, gen.prompt_ids + gen.generated)
        return gen.usage
