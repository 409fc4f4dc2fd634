"""Linear layers: the kernel-backed layer and the plain-torch ones follow one call convention
(fused RMSNorm / SwiGLU / GELU-tanh gating before the product, residual add after it) and
agree; the weight types of GGUF files (Gemma 3's Q4_K_M mix among them) take the kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_infer.backends.torch.decoder import TorchDecoder
from edge_infer.backends.torch.linear import (
    GEGLU,
    PLAIN,
    RMS_NORM,
    SWIGLU,
    DenseLinear,
    Int4Linear,
    PackedLinear,
    concat_weights,
    make_linear,
)
from edge_infer.formats.affine import quantize
from edge_infer.kernels import cpu as cpu_kernels
from edge_infer.models.loader import load_model
from tests.support.model_files import write_tiny_gguf

needs_kernel = pytest.mark.skipif(
    cpu_kernels.load() is None, reason="the CPU kernels cannot be built here"
)
CPU = torch.device("cpu")


def weight(bits: int = 4, rows: int = 48, cols: int = 128):
    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32) * 0.1
    return quantize(w, bits, 32)


@needs_kernel
def test_quantized_weights_take_the_kernel_on_cpu():
    assert isinstance(make_linear(weight(4), CPU), PackedLinear)
    assert isinstance(make_linear(weight(8), CPU), PackedLinear)


def test_without_kernels_4_bit_weights_take_torchs_int4_kernel(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "load", lambda verbose=False: None)
    assert isinstance(make_linear(weight(4), CPU), Int4Linear)


@needs_kernel
@pytest.mark.parametrize("prep", [PLAIN, RMS_NORM, SWIGLU, GEGLU])
def test_kernel_layer_agrees_with_the_plain_torch_one(prep):
    w = weight(4)
    packed, dense = make_linear(w, CPU), DenseLinear(w.dequantize(), CPU)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 256 if prep in (SWIGLU, GEGLU) else 128, generator=gen)
    norm = torch.rand(128, generator=gen) + 0.5
    args = (prep, norm if prep == RMS_NORM else None, 1e-5)
    got, want = packed(x, *args), dense(x, *args)
    assert torch.linalg.norm(got - want) < 0.02 * torch.linalg.norm(want)
    base = torch.randn(5, 48, generator=gen)
    out = base.clone()
    assert packed(x, *args, out=out) is out
    torch.testing.assert_close(out, base + got, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_gguf_quant_types_of_gemma_files_take_the_kernel(tmp_path):
    """Q4_K converts to 4 bits, Q5_K / Q6_K to 8 bits and Q8_0 losslessly to 8 bits, all in
    groups of 32: every projection and the head run on the kernel, none on a fallback."""
    pytest.importorskip("gguf")
    types = {
        "token_embd.weight": "Q8_0",
        "output.weight": "Q6_K",
        "blk.0.attn_v.weight": "Q6_K",
        "blk.0.ffn_down.weight": "Q5_K",
        "blk.1.attn_q.weight": "Q8_0",
    }
    info = write_tiny_gguf(tmp_path / "mix.gguf", "qwen3", "Q4_K", tensor_types=types)
    decoder = TorchDecoder(load_model(info["path"]), CPU)
    layers = [x for la in decoder.layers for x in (la.qkv, la.o, la.gate_up, la.down)]
    assert all(isinstance(x, PackedLinear) for x in [*layers, decoder.lm_head])
    assert {x.bits for x in layers} == {4, 8} and decoder.lm_head.bits == 8


def test_fused_weights_of_4_and_8_bits_keep_their_values_at_8():
    parts = [weight(4, rows=16), weight(8, rows=8), weight(4, rows=24)]
    fused = concat_weights(parts)
    assert fused.bits == 8 and fused.group_size == 32
    want = np.concatenate([w.dequantize() for w in parts])
    np.testing.assert_array_equal(fused.dequantize(), want)


@needs_kernel
def test_a_four_bit_scan_rescored_from_the_eight_bit_rows_is_exact_at_the_top():
    """What the decoder does with a large 8-bit head: scan a 4-bit copy, then rescore the
    best candidates from the 8-bit rows. Those logits are the 8-bit products in float32,
    the argmax is the exact one, and only the tail keeps the scan's coarser values."""
    rng = np.random.default_rng(3)
    head = quantize(rng.standard_normal((2048, 256)).astype(np.float32), 8, 32)
    exact_rows = PackedLinear.pack(head, cpu_kernels.load(), passes=1)
    scan = exact_rows.coarse_copy()
    assert (scan.bits, scan.out_features) == (4, 2048) and scan.nbytes < 0.7 * exact_rows.nbytes
    h = torch.from_numpy(rng.standard_normal((3, 256)).astype(np.float32))
    exact = h.double() @ torch.from_numpy(head.dequantize()).double().T
    logits = scan(h)
    k = 32
    coarse = logits.clone()
    exact_rows.rescore_top(logits, h, k)
    top = coarse.topk(k, dim=-1).indices  # the candidates the scan ranks best
    np.testing.assert_allclose(
        logits.gather(1, top).double(), exact.gather(1, top), rtol=1e-5, atol=1e-4
    )
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    tail = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top, False)
    assert torch.equal(logits[tail], coarse[tail])
    assert (coarse.double() - exact).abs().max() > 1e-2  # the scan alone is coarse
