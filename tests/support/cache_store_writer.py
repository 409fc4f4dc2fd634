"""Helper for the cache store crash/concurrency tests: saves an agent over and over.

Usage: ``python tests/support/cache_store_writer.py ROOT AGENT SEED FIRST COUNT``. Saves states
``FIRST .. FIRST+COUNT-1`` of ``make_state(SEED, i)``, printing ``ready`` once imported and
``committed i`` after each save returns. Every state is a pure function of (seed, i), so a
test can rebuild whatever the loaded ``extra`` names and compare it bit for bit.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from edge_infer.cache_store import AgentStore, KVBlock, KVFormat, LayerKV, split_into_blocks
from edge_infer.models.fingerprint import Fingerprint

FMT = KVFormat(bits=4, group_size=32, block_size=16)
FINGERPRINT = Fingerprint.of(weights="w-test", tokenizer="t-test", kv_format=FMT.describe())
N_LAYERS, N_KV, HEAD_DIM, MAX_LEN = 2, 2, 32, 120


@dataclass
class State:
    token_ids: list[int]
    blocks: list[KVBlock]
    messages: list[dict]
    extra: dict


@lru_cache(maxsize=8)
def _base(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shared ids [MAX_LEN] and float KV [layers, 2, n_kv, MAX_LEN, D] of a seed's history."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50_000, MAX_LEN)
    kv = rng.standard_normal((N_LAYERS, 2, N_KV, MAX_LEN, HEAD_DIM)).astype(np.float32)
    return ids, kv


def make_state(seed: int, i: int) -> State:
    """State ``i``: a prefix of the seed's history, then a branch of its own.

    The cut point varies, so successive states grow, shrink and truncate sealed blocks,
    while blocks wholly inside the shared history keep identical bytes (and files).
    """
    rng = np.random.default_rng([seed, i])
    base_ids, base_kv = _base(seed)
    cut = int(rng.integers(0, MAX_LEN))
    n = cut + int(rng.integers(0, 40))
    tail = n - cut
    ids = np.concatenate([base_ids[:cut], rng.integers(0, 50_000, tail)])
    branch = rng.standard_normal((N_LAYERS, 2, N_KV, tail, HEAD_DIM)).astype(np.float32)
    kv = np.concatenate([base_kv[:, :, :, :cut], branch], axis=3)
    layers = [LayerKV(FMT.encode(kv[li, 0]), FMT.encode(kv[li, 1])) for li in range(N_LAYERS)]
    blocks = split_into_blocks(layers, 0, FMT.block_size) if n else []
    extra_ids = [7] if i % 3 == 0 else []  # sometimes one id more than the KV holds
    return State(
        token_ids=[int(t) for t in ids] + extra_ids,
        blocks=blocks,
        messages=[{"role": "user", "content": f"état {i} of seed {seed}"}],
        extra={"seed": seed, "iteration": i, "cut": cut},
    )


def store_at(root: Path) -> AgentStore:
    return AgentStore(root, FINGERPRINT, FMT)


def main(argv: list[str]) -> None:
    root, agent, seed, first, count = argv
    store = store_at(Path(root))
    print("ready", flush=True)
    for i in range(int(first), int(first) + int(count)):
        s = make_state(int(seed), i)
        store.save(agent, s.token_ids, s.blocks, s.messages, s.extra)
        print(f"committed {i}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
