"""The quantized-weight product kernel against a plain numpy reference, on every build this
machine can run (native, AVX2-only, no SIMD): 4 and 8 bits, groups of 32/64/128, odd row
counts, 1 to 600 activation rows, and the fused RMSNorm / SwiGLU / GELU-tanh steps."""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

from edge_infer.formats.affine import quantize
from edge_infer.kernels import cpu as cpu_kernels
from edge_infer.kernels.cpu.packing import pack_weight

PLAIN, RMS_NORM, SWIGLU, GEGLU = 0, 1, 2, 3
X86 = platform.machine().lower() in ("x86_64", "amd64")

ARCHS = [
    "native",
    pytest.param("avx2", marks=[pytest.mark.slow, pytest.mark.skipif(not X86, reason="x86 only")]),
    pytest.param("generic", marks=pytest.mark.slow),
]


@pytest.fixture(params=ARCHS)
def kernel(request, monkeypatch):
    monkeypatch.setenv("EDGE_INFER_KERNEL_ARCH", request.param)
    module = cpu_kernels.load()
    if module is None:
        pytest.skip("the CPU kernels cannot be built here")
    if request.param == "avx2":
        with open("/proc/cpuinfo") as f:
            if " avx2" not in f.read():
                pytest.skip("this CPU has no AVX2")
    return module


def quantize_blocks(y: np.ndarray, passes: int = 2) -> np.ndarray:
    """What the kernel multiplies: y rounded to int8 per block of 32 (scale d = amax/127),
    with two passes plus the remainder rounded to int8 again (scale d/254)."""
    b = y.astype(np.float32).reshape(y.shape[0], -1, 32)
    amax = np.abs(b).max(axis=-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    scaled = b * inv
    q = np.rint(scaled)
    assert np.abs(q).max() <= 127
    if passes == 2:
        q2 = np.rint((scaled - q) * np.float32(254))
        assert np.abs(q2).max() <= 127
        q = q.astype(np.float64) + q2.astype(np.float64) / 254
    return (q * (amax.astype(np.float64) / 127)).reshape(y.shape)


def prepared(x: np.ndarray, prep: int, norm: np.ndarray | None, eps: float) -> np.ndarray:
    if prep == RMS_NORM:
        return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * norm
    if prep == SWIGLU:
        g, u = np.split(x.astype(np.float64), 2, axis=-1)
        return g / (1 + np.exp(-g)) * u
    if prep == GEGLU:
        g, u = np.split(x.astype(np.float64), 2, axis=-1)
        return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3))) * u
    return x.astype(np.float64)


def reference(x, w, prep=PLAIN, norm=None, eps=1e-5, passes=2) -> np.ndarray:
    """float64: the exact weights times the int8-rounded rows."""
    return quantize_blocks(prepared(x, prep, norm, eps), passes) @ w.dequantize(np.float64).T


def run(kernel, x, w, prep=PLAIN, norm=None, eps=1e-5, out=None, passes=2):
    p = pack_weight(w)
    return kernel.quant_linear(
        torch.from_numpy(x),
        torch.from_numpy(p.qweight),
        torch.from_numpy(p.scales),
        torch.from_numpy(p.biases),
        p.rows,
        p.bits,
        p.group_size,
        prep,
        None if norm is None else torch.from_numpy(norm),
        eps,
        out,
        passes,
    ).numpy()


def random_weight(rows, cols, bits, group, seed=0):
    gen = np.random.default_rng(seed)
    return quantize(gen.standard_normal((rows, cols)).astype(np.float32) * 0.05, bits, group)


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize(("m", "rows"), [(1, 16), (3, 37), (7, 200), (600, 45)])
def test_matches_the_numpy_reference(kernel, bits, group, m, rows, passes):
    cols = 384
    w = random_weight(rows, cols, bits, group, seed=m + rows)
    x = np.random.default_rng(1).standard_normal((m, cols)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    if passes == 2:
        x[-1, 64] = 40.0  # an outlier: one pass keeps only a few steps for the rest of its block
    got = run(kernel, x, w, passes=passes)
    want = reference(x, w, passes=passes)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # and close to the product with unrounded activations: two passes about 250 times closer
    exact = x.astype(np.float64) @ w.dequantize(np.float64).T
    bound = 0.01 if passes == 1 else 1e-4
    assert np.linalg.norm(got - exact) < bound * np.linalg.norm(exact)


@pytest.mark.parametrize("passes", [1, 2])
@pytest.mark.parametrize("prep", [RMS_NORM, SWIGLU, GEGLU])
def test_fused_steps(kernel, prep, passes):
    cols, rows = 256, 50
    w = random_weight(rows, cols, 4, 32)
    gen = np.random.default_rng(2)
    width = 2 * cols if prep in (SWIGLU, GEGLU) else cols
    x = (gen.standard_normal((5, width)) * 3).astype(np.float32)
    norm = (gen.random(cols) + 0.5).astype(np.float32) if prep == RMS_NORM else None
    got = run(kernel, x, w, prep, norm, 1e-5, passes=passes)
    want = reference(x, w, prep, norm, 1e-5, passes)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def test_adds_into_out(kernel):
    w = random_weight(40, 128, 4, 64)
    x = np.random.default_rng(3).standard_normal((4, 128)).astype(np.float32)
    base = np.random.default_rng(4).standard_normal((4, 40)).astype(np.float32)
    out = torch.from_numpy(base.copy())
    run(kernel, x, w, out=out)
    np.testing.assert_allclose(out.numpy(), base + run(kernel, x, w), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("passes", [1, 2])
def test_a_row_computes_the_same_in_any_batch(kernel, passes):
    """The batched-decode identity: a row's result does not depend on its neighbours."""
    for bits in (4, 8):
        w = random_weight(100, 256, bits, 32)
        x = np.random.default_rng(5).standard_normal((13, 256)).astype(np.float32)
        together = run(kernel, x, w, passes=passes)
        for i in range(13):
            assert np.array_equal(run(kernel, x[i : i + 1], w, passes=passes)[0], together[i])
        assert np.array_equal(run(kernel, x[3:9], w, passes=passes), together[3:9])


@pytest.mark.parametrize(
    "bits,m,k,threads", [(4, 2, 7, None), (8, 2, 7, None), (8, 1, 64, 8), (4, 3, 120, 8)]
)
def test_rescore_top_gives_exact_logits_of_the_best(kernel, bits, m, k, threads):
    """Also with more threads than rows: each row's vocabulary is then searched in spans
    (some holding fewer than k values) whose best are merged."""
    rows, cols = 300, 128
    if threads is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        _check_rescore_top(kernel, bits, rows, cols, m, k)
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def _check_rescore_top(kernel, bits, rows, cols, m, k):
    w = random_weight(rows, cols, bits, 32)
    h = np.random.default_rng(6).standard_normal((m, cols)).astype(np.float32)
    logits = torch.from_numpy(run(kernel, h, w))
    approx = logits.numpy().copy()
    p = pack_weight(w)
    idx = kernel.rescore_top(
        logits,
        torch.from_numpy(h),
        torch.from_numpy(p.qweight),
        torch.from_numpy(p.scales),
        torch.from_numpy(p.biases),
        rows,
        bits,
        32,
        k,
    ).numpy()
    exact = h.astype(np.float64) @ w.dequantize(np.float64).T
    for n in range(m):
        assert list(idx[n]) == list(np.argsort(-approx[n], kind="stable")[:k])
        np.testing.assert_allclose(
            logits.numpy()[n, idx[n]], exact[n, idx[n]], rtol=1e-5, atol=1e-5
        )
        rest = np.setdiff1d(np.arange(rows), idx[n])
        assert np.array_equal(logits.numpy()[n, rest], approx[n, rest])


def test_requantized_copy_is_close_to_the_original(kernel):
    w = random_weight(70, 256, 8, 64)
    p = pack_weight(w)
    args = [torch.from_numpy(a) for a in (p.qweight, p.scales, p.biases)]
    q4, s4, b4 = kernel.requantize4(*args, p.rows, 8, 64)
    ids = torch.arange(70)
    exact = kernel.weight_rows(ids, *args, 70, 8, 64).numpy()
    coarse = kernel.weight_rows(ids, q4, s4, b4, 70, 4, 32).numpy()
    step = (exact.reshape(70, -1, 32).max(-1) - exact.reshape(70, -1, 32).min(-1)) / 15
    assert (np.abs(coarse - exact).reshape(70, -1, 32).max(-1) <= step * 0.51 + 1e-3).all()
    np.testing.assert_allclose(exact, w.dequantize(), rtol=1e-6, atol=1e-6)
