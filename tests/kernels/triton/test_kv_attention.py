"""The Triton one-token attention kernel against the plain-torch reference: on the GPU where
there is one, else in Triton's interpreter on CPU tensors (small caches, so it stays quick)."""

from __future__ import annotations

import os

import pytest
import torch

from edge_infer.backends.torch.kv_attention import attend_reference
from edge_infer.kernels import triton as triton_kernels
from tests.support.kv_caches import filled_cache, one_token

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # read when the kernel module is imported (by load() below)
    os.environ.setdefault("TRITON_INTERPRET", "1")

needs_triton = pytest.mark.skipif(
    triton_kernels.load() is None, reason="triton is not installed (or kernels are off)"
)

# (query heads, kv heads, head_dim, group size)
LAYOUTS = [(9, 3, 64, 64), (8, 2, 128, 64), (4, 4, 32, 32), (7, 1, 64, 32)]


def run_kernel(caches, layer, q, k, v, tokens_per_run=None):
    """The kernel over ``caches`` as the torch backend calls it."""
    pointers, metas = [], []
    for cache in caches:
        ptrs, meta = cache.kernel_layout(layer, cache.length + 1)
        pointers += ptrs
        metas += meta
    first = caches[0]
    return triton_kernels.load().attend_new_token(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        pointers,
        metas,
        first.rotation,
        first.rotation_t,
        first.bits,
        first.group_size,
        tokens_per_run=tokens_per_run,
    )


def reference(bits, n, layout, k, v, q, seed=0):
    """The plain-torch result for a twin of the cache that stored the token with update()."""
    n_q, n_kv, dim, group = layout
    twin = filled_cache(bits, n, n_kv, dim, group, seed=seed, device=DEVICE)
    twin.update(1, k[:, None], v[:, None])
    return twin, attend_reference(twin, 1, q[:, None])[:, 0]


@needs_triton
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize(("n", "tokens_per_run"), [(0, None), (1, None), (257, None), (340, 64)])
def test_kernel_matches_reference(layout, bits, n, tokens_per_run):
    """Sealed blocks, the tail and the new token; one run, or runs merged (341 tokens in 64s:
    runs of sealed rows only, of tail rows only, and of tail rows and the new token)."""
    n_q, n_kv, dim, group = layout
    cache = filled_cache(bits, n, n_kv, dim, group, device=DEVICE)
    q, k, v = one_token(cache, n_q)
    cache.reserve_next()
    out = run_kernel([cache], 1, q[None], k[None], v[None], tokens_per_run)[0]
    twin, ref = reference(bits, n, layout, k, v, q)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=5e-5)
    # the token was stored as update() stores it
    for c in (cache, twin):
        c.advance(1)
    for got, want in zip(cache.readable(1, n + 1), twin.readable(1, n + 1), strict=True):
        assert torch.equal(got, want)


@needs_triton
@pytest.mark.parametrize("bits", [4, 16])
def test_a_batch_computes_what_each_sequence_computes_alone(bits):
    """Sequences of different lengths and buffer sizes in one call, some split into runs."""
    layout = (9, 3, 64, 64)
    lengths = [5, 256, 300]
    caches = [filled_cache(bits, n, 3, 64, 64, seed=n, device=DEVICE) for n in lengths]
    tokens = [one_token(c, 9, seed=i) for i, c in enumerate(caches)]
    for c in caches:
        c.reserve_next()
    q, k, v = (torch.stack([t[i] for t in tokens]) for i in range(3))
    together = run_kernel(caches, 1, q, k, v, tokens_per_run=128)
    for b, n in enumerate(lengths):
        _, ref = reference(bits, n, layout, k[b], v[b], q[b], seed=n)
        torch.testing.assert_close(together[b], ref, rtol=1e-4, atol=5e-5)


@needs_triton
def test_a_sequence_gets_the_same_bits_in_any_batch():
    """Its runs depend on its own length only (a longer sequence beside it adds runs without
    tokens for it), so batching never changes a result."""
    lengths = [40, 300, 600]
    caches = [filled_cache(4, n, 3, 64, 64, seed=n, device=DEVICE) for n in lengths]
    tokens = [one_token(c, 9, seed=i) for i, c in enumerate(caches)]
    for c in caches:
        c.reserve_next()
    q, k, v = (torch.stack([t[i] for t in tokens]) for i in range(3))
    together = run_kernel(caches, 0, q, k, v, tokens_per_run=256)
    for b, n in enumerate(lengths):
        cache = filled_cache(4, n, 3, 64, 64, seed=n, device=DEVICE)
        cache.reserve_next()
        alone = run_kernel([cache], 0, q[b : b + 1], k[b : b + 1], v[b : b + 1], 256)
        assert torch.equal(together[b], alone[0])


def test_the_kernel_takes_power_of_two_heads_only():
    assert triton_kernels.accepts(64, 4, 64) and triton_kernels.accepts(128, 16, 128)
    assert not triton_kernels.accepts(96, 4, 32)  # tl.arange needs a power of two
    assert not triton_kernels.accepts(64, 4, 48)
    assert not triton_kernels.accepts(512, 16, 64)


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("EDGE_INFER_KERNELS", "off")
    assert triton_kernels.load() is None
