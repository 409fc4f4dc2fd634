"""Block and page boxes bound real attention scores, whichever code made them."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.cache_store import (
    KVFormat,
    block_from_bytes,
    block_to_bytes,
    merge_blocks,
    split_into_blocks,
)
from edge_infer.cache_store.blocks import attention_keys
from edge_infer.cache_store.kv_format import kv_dequantize
from edge_infer.offload import block_page_bounds, page_bounds, quest_bounds, true_max_scores
from tests.support.installed import HAS_MLX
from tests.support.sparse_runs import real_ids, recorded_queries

N, STEPS = 600, 4  # two sealed blocks and a float16 tail; queries of four decode steps


@pytest.fixture(scope="module")
def real(default_model, tmp_path_factory):
    from edge_infer.backends.torch.backend import TorchBackend

    n_layers = default_model.config.num_layers
    ids = real_ids(default_model.tokenizer, N + STEPS)
    torch_backend = TorchBackend(default_model, device="cpu", kv_bits=4)
    cache = torch_backend.new_cache()
    torch_backend.forward(ids[:N], cache)
    sources = {"torch": [b for b in cache.blocks() if b.sealed]}
    readable = [cache.readable(i, 512) for i in range(n_layers)]
    queries = recorded_queries(torch_backend, cache, ids[N:], n_layers)
    # the same KV cut again: these abstracts are computed by the cache store
    sources["split_into_blocks"] = split_into_blocks(merge_blocks(sources["torch"]), 0, 256)
    folder = tmp_path_factory.mktemp("blocks")
    fmt = KVFormat(4, 64, 256)
    disk = []
    for i, block in enumerate(sources["torch"]):
        path = folder / f"{i}.safetensors"
        path.write_bytes(block_to_bytes(block, fmt))
        disk.append(block_from_bytes(path.read_bytes()))
    sources["disk round trip"] = disk
    if HAS_MLX:  # the MLX cache fed the same real K/V (its prefill is slow on Linux CPUs)
        import mlx.core as mx

        from edge_infer.backends.mlx.kv_cache import MLXCache

        cfg = default_model.config
        mlx_cache = MLXCache(n_layers, cfg.num_kv_heads, cfg.head_dim, 4, 64)
        for a in range(0, 512, 256):
            for i, (k, v) in enumerate(readable):
                kv = (mx.array(x[None, :, a : a + 256].numpy()) for x in (k, v))
                mlx_cache.update(i, *kv)
            mlx_cache.advance(256)
        sources["mlx"] = [b for b in mlx_cache.blocks() if b.sealed]
    return queries, sources


def _violations(q: np.ndarray, lo: np.ndarray, hi: np.ndarray, keys: np.ndarray) -> int:
    """How many (query head, block) scores exceed their bound; keys [n_kv, T, D], one page."""
    bound = quest_bounds(q, lo[:, None], hi[:, None])
    exact = true_max_scores(q, keys, keys.shape[1])
    return int((bound < exact - 1e-4 * (1 + np.abs(exact))).sum())


@pytest.mark.slow
def test_block_abstracts_bound_real_scores_from_every_producer(real):
    queries, sources = real
    expected = {"torch", "split_into_blocks", "disk round trip"} | ({"mlx"} if HAS_MLX else set())
    assert set(sources) == expected
    for name, blocks in sources.items():
        assert len(blocks) == 2, name
        for block in blocks:
            assert block.abstract is not None
            for layer, (lo, hi) in enumerate(block.abstract):
                keys = attention_keys(block.layers[layer])
                assert np.all(lo.astype(np.float32) <= keys.min(axis=1) + 1e-6), (name, layer)
                assert np.all(hi.astype(np.float32) >= keys.max(axis=1) - 1e-6), (name, layer)
                for q in queries[layer]:
                    assert _violations(q, lo, hi, keys) == 0, (name, layer)


@pytest.mark.slow
def test_page_boxes_bound_real_scores_and_a_stored_domain_box_does_not(real):
    queries, sources = real
    wrong_domain = 0
    for block in sources["torch"]:
        for page in (32, 64):
            for layer, (lo, hi) in enumerate(block_page_bounds(block, page)):
                keys = attention_keys(block.layers[layer])
                for q in queries[layer]:
                    bound = quest_bounds(q, lo, hi)
                    exact = true_max_scores(q, keys, page)
                    assert np.all(bound >= exact - 1e-4 * (1 + np.abs(exact))), (page, layer)
        # boxes of the stored (rotated) keys, scored against the same real queries: loose
        # 256-token boxes hide the wrong domain, 8-token pages show it
        for layer, lkv in enumerate(block.layers):
            lo, hi = page_bounds(kv_dequantize(lkv.keys), 8)
            keys = attention_keys(lkv)
            for q in queries[layer]:
                exact = true_max_scores(q, keys, 8)
                bound = quest_bounds(q, lo, hi)
                wrong_domain += int((bound < exact - 1e-4 * (1 + np.abs(exact))).sum())
    assert wrong_domain > 0  # these checks can fail: a box in the wrong domain is caught
