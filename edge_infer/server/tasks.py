"""What the daemon runs for a request: an agent's turn, or a stateless generation."""

from __future__ import annotations

from typing import Any

from edge_infer.agent_turn import AgentTurn
from edge_infer.engine import Engine, Usage
from edge_infer.generation import Generation, Piece
from edge_infer.sampling import SamplingParams
from edge_infer.server.conversation import split_request_messages
from edge_infer.server.prefix_pool import PrefixPool


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
    """A generation on a borrowed prefix cache, given back when it ends."""

    def __init__(
        self, engine: Engine, pool: PrefixPool, ids: list[int], params: SamplingParams
    ) -> None:
        engine._check_fits(len(ids))
        self._pool = pool
        self._slot = pool.acquire(ids)
        self._released = False
        try:
            self.generation = Generation(engine, ids, params, self._slot.cache, Usage())
        except BaseException:
            self.finish()
            raise

    def record(self, pieces: list[Piece]) -> list[str]:
        return [text for _, text in pieces if text]

    def finish(self) -> Usage | None:
        gen = getattr(self, "generation", None)
        if not self._released:
            self._released = True
            ids = gen.prompt_ids + gen.generated if gen is not None else []
            self._pool.release(self._slot, ids)
        if gen is None:
            return None
        gen.cancel()
        return gen.usage
