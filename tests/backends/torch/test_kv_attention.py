"""Attention over the stored KV form: the CPU kernel and the prefill path against the
plain-torch reference (small random caches; the model-level agreement is tested elsewhere)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from edge_infer.backends.torch.kv_attention import (
    attend_new_tokens,
    attend_reference,
    attend_tokens,
)
from edge_infer.backends.torch.kv_cache import TorchKVCache
from edge_infer.kernels import cpu as cpu_kernels

needs_kernel = pytest.mark.skipif(
    cpu_kernels.load() is None, reason="the CPU attention kernel cannot be built here"
)

# (query heads, kv heads, head_dim, group size)
LAYOUTS = [(9, 3, 64, 64), (8, 2, 128, 64), (4, 4, 32, 32), (7, 1, 64, 32)]


def filled_cache(
    bits: int, n: int, n_kv: int, dim: int, group: int, seed: int = 0, window: int = 0
):
    """Two layers of random K/V; the second attends in a sliding ``window`` (0: globally)."""
    gen = torch.Generator().manual_seed(seed)
    cache = TorchKVCache(
        2, n_kv, dim, torch.device("cpu"), kv_bits=bits, group_size=group, windows=[0, window]
    )
    while cache.length < n:
        t = min(n - cache.length, cache.max_tokens_in_one_call(), 37)
        for layer in range(2):
            k = torch.randn(n_kv, t, dim, generator=gen) * 2
            cache.update(layer, k, torch.randn(n_kv, t, dim, generator=gen))
        cache.advance(t)
    return cache


def one_token(cache: TorchKVCache, n_q: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    shape = (cache.n_kv, cache.head_dim)
    q = torch.randn(n_q, cache.head_dim, generator=gen) * 2
    return q, torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen)


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 700])
def test_kernel_matches_reference(layout, bits, n):
    n_q, n_kv, dim, group = layout
    cache = filled_cache(bits, n, n_kv, dim, group)
    q, k, v = one_token(cache, n_q)
    cache.reserve_next()
    fast = attend_new_tokens([cache], 1, q[None], k[None], v[None])[0]
    reference_cache = filled_cache(bits, n, n_kv, dim, group)
    reference_cache.update(1, k[:, None], v[:, None])
    ref = attend_reference(reference_cache, 1, q[:, None])[:, 0]
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=5e-5)


@needs_kernel
@pytest.mark.parametrize("bits", [4, 16])
def test_kernel_stores_the_token_as_update_does(bits):
    cache = filled_cache(bits, 300, 3, 64, 64)
    twin = filled_cache(bits, 300, 3, 64, 64)
    q, k, v = one_token(cache, 9)
    cache.reserve_next()
    attend_new_tokens([cache], 0, q[None], k[None], v[None])
    twin.update(0, k[:, None], v[:, None])
    for c in (cache, twin):
        c.advance(1)
    for got, want in zip(cache.readable(0, 301), twin.readable(0, 301), strict=True):
        assert torch.equal(got, want)


@needs_kernel
def test_a_batch_computes_what_each_sequence_computes_alone():
    lengths = [5, 256, 300, 513]
    caches = [filled_cache(4, n, 3, 64, 64, seed=n) for n in lengths]
    tokens = [one_token(c, 9, seed=i) for i, c in enumerate(caches)]
    for c in caches:
        c.reserve_next()
    q, k, v = (torch.stack([t[i] for t in tokens]) for i in range(3))
    together = attend_new_tokens(caches, 0, q, k, v)
    for b, n in enumerate(lengths):
        alone_cache = filled_cache(4, n, 3, 64, 64, seed=n)
        alone_cache.reserve_next()
        alone = attend_new_tokens([alone_cache], 0, q[b : b + 1], k[b : b + 1], v[b : b + 1])
        assert torch.equal(together[b], alone[0])


@pytest.mark.parametrize("path", ["kernel", "scratch"])
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize(("n", "T"), [(0, 20), (100, 50), (256, 20), (300, 200), (1000, 24)])
def test_prefill_chunk_matches_reference(bits, n, T, path, monkeypatch):
    if path == "kernel" and cpu_kernels.load() is None:
        pytest.skip("the CPU attention kernel cannot be built here")
    if path == "scratch":
        monkeypatch.setattr(cpu_kernels, "load", lambda verbose=False: None)
    cache = filled_cache(bits, n, 3, 64, 64)
    T = min(T, cache.max_tokens_in_one_call())
    gen = torch.Generator().manual_seed(7)
    cache.update(0, torch.randn(3, T, 64, generator=gen), torch.randn(3, T, 64, generator=gen))
    q = torch.randn(9, T, 64, generator=gen) * 2
    torch.testing.assert_close(
        attend_tokens(cache, 0, q), attend_reference(cache, 0, q), rtol=1e-4, atol=5e-5
    )


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize(("n", "T"), [(0, 2), (255, 1), (256, 33), (600, 70)])
def test_chunk_kernel_matches_reference_for_every_layout(layout, bits, n, T):
    """Several groups per row, head sizes 32 to 128, rows that do not fill the lanes."""
    n_q, n_kv, dim, group = layout
    cache = filled_cache(bits, n, n_kv, dim, group)
    T = min(T, cache.max_tokens_in_one_call())
    gen = torch.Generator().manual_seed(5)
    shape = (n_kv, T, dim)
    cache.update(1, torch.randn(*shape, generator=gen), torch.randn(*shape, generator=gen))
    q = torch.randn(n_q, T, dim, generator=gen) * 2
    torch.testing.assert_close(
        attend_tokens(cache, 1, q), attend_reference(cache, 1, q), rtol=1e-4, atol=5e-5
    )


def test_without_the_kernel_one_token_takes_the_scratch_path(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda verbose=False: None)
    cache = filled_cache(4, 300, 3, 64, 64)
    twin = filled_cache(4, 300, 3, 64, 64)
    q, k, v = one_token(cache, 9)
    cache.reserve_next()
    out = attend_new_tokens([cache], 0, q[None], k[None], v[None])[0]
    twin.update(0, k[:, None], v[:, None])
    ref = attend_reference(twin, 0, q[:, None])[:, 0]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=5e-5)


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("EDGE_INFER_KERNELS", "off")
    assert not cpu_kernels.enabled()
    assert cpu_kernels.load() is None


def _load_in_a_new_process(**env: str) -> subprocess.CompletedProcess:
    code = "from edge_infer.kernels.cpu import load; print('module', load())"
    return subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize("cause", ["no compiler", "unwritable folder"])
def test_an_unbuildable_kernel_falls_back_with_a_message(cause, tmp_path):
    if cause == "no compiler":
        env = {"EDGE_INFER_KERNEL_DIR": str(tmp_path), "CXX": "/nonexistent/c++"}
    else:
        blocker = tmp_path / "file"
        blocker.write_text("not a folder")
        env = {"EDGE_INFER_KERNEL_DIR": str(blocker / "kernels")}
    proc = _load_in_a_new_process(**env)
    assert proc.returncode == 0, proc.stderr
    assert "module None" in proc.stdout
    assert "could not be built" in proc.stderr


def brute_force(cache: TorchKVCache, layer: int, q: torch.Tensor, window: int) -> torch.Tensor:
    """Attention of q [n_q, T, D] at cache.length.. with an explicit per-pair mask."""
    start, T = cache.length, q.shape[1]
    keys, values = cache.readable(layer, start + T)
    group = q.shape[0] // keys.shape[0]
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    scores = q @ keys.transpose(1, 2) / q.shape[-1] ** 0.5
    for t in range(T):
        for j in range(start + T):
            if j > start + t or (window and start + t - j >= window):
                scores[:, t, j] = -torch.inf
    return scores.softmax(-1) @ values


@pytest.mark.parametrize("path", ["kernel", "scratch"])
@pytest.mark.parametrize("bits", [4, 16])
@pytest.mark.parametrize(
    ("n", "T", "window"), [(0, 40, 16), (100, 50, 30), (300, 20, 64), (520, 1, 100), (600, 70, 700)]
)
def test_sliding_window_chunks_match_brute_force(path, bits, n, T, window, monkeypatch):
    if path == "kernel" and cpu_kernels.load() is None:
        pytest.skip("the CPU attention kernel cannot be built here")
    if path == "scratch":
        monkeypatch.setattr(cpu_kernels, "load", lambda verbose=False: None)
    cache = filled_cache(bits, n, 2, 64, 32, window=window)
    T = min(T, cache.max_tokens_in_one_call())
    gen = torch.Generator().manual_seed(3)
    cache.update(1, torch.randn(2, T, 64, generator=gen), torch.randn(2, T, 64, generator=gen))
    q = torch.randn(6, T, 64, generator=gen) * 2
    want = brute_force(cache, 1, q, window)
    torch.testing.assert_close(attend_reference(cache, 1, q), want, rtol=1e-4, atol=5e-5)
    torch.testing.assert_close(attend_tokens(cache, 1, q), want, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("path", ["kernel", "scratch"])
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize(("n", "window"), [(10, 4), (300, 37), (700, 256), (700, 600)])
def test_sliding_window_one_token_matches_brute_force(path, bits, n, window, monkeypatch):
    if path == "kernel" and cpu_kernels.load() is None:
        pytest.skip("the CPU attention kernel cannot be built here")
    if path == "scratch":
        monkeypatch.setattr(cpu_kernels, "load", lambda verbose=False: None)
    caches = [filled_cache(bits, n + b, 2, 64, 32, seed=b, window=window) for b in range(2)]
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 6, 64, generator=gen) * 2
    k, v = torch.randn(2, 2, 64, generator=gen), torch.randn(2, 2, 64, generator=gen)
    for cache in caches:
        cache.reserve_next()
    fast = attend_new_tokens(caches, 1, q, k, v)
    for b in range(len(caches)):
        twin = filled_cache(bits, n + b, 2, 64, 32, seed=b, window=window)
        twin.update(1, k[b, :, None], v[b, :, None])
        want = brute_force(twin, 1, q[b, :, None], window)[:, 0]
        torch.testing.assert_close(fast[b], want, rtol=1e-4, atol=5e-5)
