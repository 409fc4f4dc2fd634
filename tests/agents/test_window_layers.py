"""Agents of a model with sliding-window layers (a tiny random Gemma 3): the store keeps every
layer of every block, a new engine restores and continues token-identically, and a
conversation edited back to an early token continues as if it had been prefilled fresh."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer import Engine
from edge_infer.cache_store.kv_format import QuantizedKV
from tests.support.model_files import write_tiny_gemma3_gguf

pytest.importorskip("gguf")

GREEDY = {"temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory):
    return write_tiny_gemma3_gguf(tmp_path_factory.mktemp("gemma3") / "g.gguf", "Q8_0")["path"]


def words(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join("".join(rng.choice(list("abcdefghij"), 4)) for _ in range(n))


def engine(gemma_path, cache_dir, monkeypatch) -> Engine:
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(cache_dir))
    return Engine.load(gemma_path, backend="torch")


def test_window_layers_persist_restore_and_edit_back(gemma_path, tmp_path, monkeypatch):
    long, later = words(260, 1), words(20, 2)
    first = engine(gemma_path, tmp_path / "a", monkeypatch)
    agent = first.agent("w")
    reply = agent.chat(long, **GREEDY)
    held = first.agent_manager.state("w").cache
    assert held is not None and held.length > 3 * 256  # the window layers dropped blocks
    assert held.sealed_length > 0
    first.flush()

    # on disk: every layer of every block
    restored = engine(gemma_path, tmp_path / "a", monkeypatch)
    snap = restored.agent_manager.store.load("w")
    assert snap is not None and snap.valid_tokens == held.length
    n_layers = restored.backend.config.num_layers
    sealed = [b for b in snap.blocks if b.sealed]
    assert len(sealed) == held.sealed_length // 256
    for b in sealed:
        assert len(b.layers) == n_layers
        assert all(isinstance(x.keys, QuantizedKV) for x in b.layers)

    # a new engine continues exactly as one that never stopped
    fresh = engine(gemma_path, tmp_path / "b", monkeypatch)
    straight = fresh.agent("w")
    assert straight.chat(long, **GREEDY) == reply
    again = restored.agent("w")
    assert again.chat(later, **GREEDY) == straight.chat(later, **GREEDY)
    assert again.usage.cached_tokens > 3 * 256

    # edited back to an early token (inside blocks the window layers had dropped)
    edited = long[: len(long) // 2] + " " + words(10, 3)
    turn = again.start_turn(edited, keep_messages=0, **GREEDY)
    text = "".join(turn.stream())
    turn.finish()
    assert 256 <= again.usage.cached_tokens < held.length - 256
    cold = engine(gemma_path, tmp_path / "c", monkeypatch).agent("w")
    assert cold.chat(edited, **GREEDY) == text


def test_window_layers_saved_on_torch_continue_on_mlx(gemma_path, tmp_path, monkeypatch):
    """The cross-backend cache: an agent saved by the torch backend (sealed blocks beyond
    the local layers' window) is restored and continued by the MLX backend from its cache."""
    pytest.importorskip("mlx_lm")
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path))
    long, later = words(260, 1), words(20, 2)
    first = Engine.load(gemma_path, backend="torch")
    first.agent("x").chat(long, **GREEDY)
    held = first.agent_manager.state("x").cache.length
    first.flush()

    on_mlx = Engine.load(gemma_path, backend="mlx")
    agent = on_mlx.agent("x")
    assert agent.tokens == held > 3 * 256
    reply = agent.chat(later, **GREEDY)
    assert agent.usage.cached_tokens > 3 * 256
    assert reply
