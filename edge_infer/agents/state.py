"""What an agent holds between turns, and fitting its conversation into the context."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from edge_infer.backends.base import KVCache
from edge_infer.cache_store import KVBlock, common_prefix_len
from edge_infer.errors import ContextLengthError
from edge_infer.offload.index import SparseState
from edge_infer.offload.tiers import SequenceTiers

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
    # offloaded KV (see ``Engine.load(kv_memory=...)``): its bytes in the host pool and
    # left on disk, and the share of pages read that the pool served (None: not offloaded)
    offloaded: bool = False
    kv_ram_bytes: int = 0
    kv_disk_bytes: int = 0
    hit_rate: float | None = None


@dataclass
class AgentState:
    """What the engine holds for one agent between turns."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)  # ids the blocks/cache hold
    blocks: list[KVBlock] = field(default_factory=list)  # exported form of the cache
    cache: KVCache | None = None  # live backend cache (hot), or None
    tiers: SequenceTiers | None = None  # where the live cache's offloaded layers are
    sparse: SparseState | None = None  # the offloaded cache's page selection and index
    files: list[str] = field(default_factory=list)  # block files ``blocks`` came from
    suspect: bool = False  # files mapped unverified failed their hash later: reload
    last_used: float = 0.0
    busy: int = 0  # turns in progress (guarded by ``lock``)
    lock: threading.RLock = field(default_factory=threading.RLock)


def fit_messages(
    render: Callable[[list[dict[str, Any]]], list[int]],
    messages: list[dict[str, Any]],
    limit: int,
    policy: str,
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


def reuse_cached_spelling(
    cached: Sequence[int], rendered: list[int], token_bytes: Callable[[int], bytes]
) -> list[int]:
    """``rendered`` with as much of its start as possible spelled by the ``cached`` ids: up to
    the last point where both spell the same bytes and both end a token.

    A reply the model generated (a grammar-forced tool call especially) need not be split
    into tokens the way the tokenizer splits the same text when the conversation is rendered
    again; keeping the generated ids keeps the cache of the reply usable.
    """
    keep = common_prefix_len(cached, rendered)
    i = j = keep
    spelled_c, spelled_r = bytearray(), bytearray()
    best = (keep, keep)
    while i < len(cached) and j < len(rendered):
        if len(spelled_c) <= len(spelled_r):
            spelled_c += token_bytes(cached[i])
            i += 1
        else:
            spelled_r += token_bytes(rendered[j])
            j += 1
        if len(spelled_c) == len(spelled_r):
            if spelled_c != spelled_r:
                break
            best = (i, j)
    i, j = best
    return [*cached[:i], *rendered[j:]]
