"""Small random torch KV caches in the stored form, and one new token for them."""

from __future__ import annotations

import torch

from edge_infer.backends.torch.kv_cache import TorchKVCache


def filled_cache(
    bits: int, n: int, n_kv: int, dim: int, group: int, seed: int = 0, device: str = "cpu"
) -> TorchKVCache:
    """Two layers of ``n`` random tokens, written in calls of up to 37 tokens (so sealed
    blocks, a float16 tail and a grown buffer all occur); the same seed gives the same cache
    on any device."""
    gen = torch.Generator().manual_seed(seed)
    cache = TorchKVCache(2, n_kv, dim, torch.device(device), kv_bits=bits, group_size=group)
    while cache.length < n:
        t = min(n - cache.length, cache.max_tokens_in_one_call(), 37)
        for layer in range(2):
            k = torch.randn(n_kv, t, dim, generator=gen) * 2
            cache.update(layer, k.to(device), torch.randn(n_kv, t, dim, generator=gen).to(device))
        cache.advance(t)
    return cache


def one_token(cache: TorchKVCache, n_q: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """q [n_q, D], k and v [n_kv, D] of a new token for ``cache``, on its device."""
    gen = torch.Generator().manual_seed(seed)
    shape = (cache.n_kv, cache.head_dim)
    q = torch.randn(n_q, cache.head_dim, generator=gen) * 2
    k, v = torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)
    return q.to(cache.device), k.to(cache.device), v.to(cache.device)
