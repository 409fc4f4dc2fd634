"""Decoding several sequences together: one batched forward pass per step."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from edge_infer.generation.runner import Runner
from edge_infer.generation.sequence import Generation, Piece

# Sequences per batched forward pass; more are split into several passes.
MAX_BATCH = 8


def forward_step(
    runner: Runner, generations: Sequence[Generation], max_batch: int = MAX_BATCH
) -> None:
    """Feed each generation's ``next_input`` through the model and hand it its logits.

    Sequences with different lengths share one pass: the projections and the MLP read the
    weights once for all of them, attention runs over each sequence's own cache.
    """
    live = [g for g in generations if g.next_input is not None]
    for i in range(0, len(live), max_batch):
        part = live[i : i + max_batch]
        logits = runner.step_batch([g.next_input for g in part], [g.cache for g in part])
        for g, row in zip(part, logits, strict=True):
            g.feed(row)


def decode_together(
    runner: Runner, generations: Sequence[Generation], max_batch: int = MAX_BATCH
) -> Iterator[tuple[int, list[Piece]]]:
    """Prefill each generation, then decode all of them to the end in batched steps.

    Yields (index, pieces) as each sequence samples, in step order.
    """
    for g in generations:
        g.prefill()
    active = list(range(len(generations)))
    while active:
        for i in active:
            yield i, generations[i].sample()
        active = [i for i in active if not generations[i].finished]
        forward_step(runner, [generations[i] for i in active], max_batch)
