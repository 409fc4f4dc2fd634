"""Shared helpers for the cache store tests: random KV and bit-exact comparisons."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_infer.cache_store import (
    AgentStore,
    KVBlock,
    KVFormat,
    LayerKV,
    QuantizedKV,
    split_into_blocks,
)
from edge_infer.models.fingerprint import Fingerprint


def random_layers(
    fmt: KVFormat, n_tokens: int, n_layers: int = 2, n_kv: int = 2, head_dim: int = 64, seed=0
) -> list[LayerKV]:
    """Random per-layer K/V in format ``fmt``."""
    rng = np.random.default_rng(seed)
    return [
        LayerKV(
            fmt.encode(rng.standard_normal((n_kv, n_tokens, head_dim)).astype(np.float32), i),
            fmt.encode(rng.standard_normal((n_kv, n_tokens, head_dim)).astype(np.float32), i),
        )
        for i in range(n_layers)
    ]


def assert_kv_equal(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, QuantizedKV):
        assert (a.bits, a.group_size) == (b.bits, b.group_size)
        for part in ("packed", "scales", "biases"):
            x, y = getattr(a, part), getattr(b, part)
            assert x.dtype == y.dtype and x.shape == y.shape
            assert x.tobytes() == y.tobytes()
    else:
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_blocks_equal(a: list[KVBlock], b: list[KVBlock]) -> None:
    """Same spans, sealed flags, abstracts and KV bytes."""
    assert [(x.start, x.length, x.sealed) for x in a] == [(y.start, y.length, y.sealed) for y in b]
    for x, y in zip(a, b, strict=True):
        assert x.n_layers == y.n_layers
        for lx, ly in zip(x.layers, y.layers, strict=True):
            assert_kv_equal(lx.keys, ly.keys)
            assert_kv_equal(lx.values, ly.values)
        if x.abstract is None:
            assert y.abstract is None
        else:
            for (lo1, hi1), (lo2, hi2) in zip(x.abstract, y.abstract, strict=True):
                assert lo1.tobytes() == lo2.tobytes() and hi1.tobytes() == hi2.tobytes()


Q4 = KVFormat(4, 64, 16)
F16 = KVFormat(16, 64, 16)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tell me about the weather in Lisbon " * 5},
]


def make_store(root: Path, fmt: KVFormat = Q4, model: str = "TestModel") -> AgentStore:
    fp = Fingerprint.of(
        weights=f"w-{model}", tokenizer="t", chat_template="c", kv_format=fmt.fingerprint_tag()
    )
    return AgentStore(root, fp, fmt, model_record={"name": model, "source": f"/models/{model}"})


def save_agent(store: AgentStore, agent: str, n_tokens: int, seed: int = 0) -> list[str]:
    """Save ``n_tokens`` of random KV (one id more than the KV holds); the block file names."""
    layers = random_layers(store.fmt, n_tokens, seed=seed)
    blocks = split_into_blocks(layers, 0, store.fmt.block_size)
    m = store.save(agent, list(range(100, 101 + n_tokens)), blocks, messages=MESSAGES)
    return [b.file for b in m.blocks]
