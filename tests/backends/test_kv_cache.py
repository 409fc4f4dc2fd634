"""Backend KV caches in the stored format: quantize on write, attend as stored, move freely."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_infer.backends.torch.kv_quant import dequantize_kv, quantize_kv
from edge_infer.cache_store.kv_format import KVFormat
from edge_infer.cache_store.rotation import hadamard, rotate
from edge_infer.formats.affine import quantize

QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (8, 64)])
def test_torch_kv_quantizer_is_bit_identical_to_numpy(bits, group):
    rng = np.random.default_rng(bits + group)
    x = (rng.standard_normal((3, 50, 64)) * rng.uniform(0.1, 9, (3, 50, 1))).astype(np.float32)
    packed, scales, biases = quantize_kv(torch.from_numpy(x), bits, group)
    ref = quantize(x.reshape(-1, 64), bits, group)
    assert np.array_equal(packed.numpy().view(np.uint32).reshape(ref.packed.shape), ref.packed)
    assert np.array_equal(scales.numpy().reshape(ref.scales.shape), ref.scales)
    assert np.array_equal(biases.numpy().reshape(ref.biases.shape), ref.biases)
    deq = dequantize_kv(packed, scales, biases, bits, group).numpy().reshape(-1, 64)
    assert np.array_equal(deq, ref.dequantize())


def test_hadamard_is_orthogonal_and_its_own_inverse():
    h = hadamard(64)
    np.testing.assert_allclose(h @ h, np.eye(64), atol=1e-6)
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_allclose(rotate(rotate(x)), x, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(48)


def _backends(default_model, bits):
    from edge_infer.backends.torch.backend import TorchBackend

    out = [TorchBackend(default_model, device="cpu", kv_bits=bits)]
    try:
        from edge_infer.backends.mlx.backend import MLXBackend

        out.append(MLXBackend(default_model, kv_bits=bits))
    except ImportError:  # pragma: no cover - mlx missing
        pass
    return out


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_restore_then_continue_is_bit_exact(default_model, bits):
    ids = np.array(default_model.tokenizer.encode("The quick brown fox jumps. " * 80))
    for backend in _backends(default_model, bits):
        live = backend.new_cache()
        backend.forward(ids[:300], live)  # one sealed block and a float16 tail
        blocks = live.blocks()
        fmt = KVFormat(bits=bits)
        assert [(b.start, b.length, b.sealed) for b in blocks] == [(0, 256, True), (256, 44, False)]
        for b in blocks:
            assert all(fmt.accepts_layer(x, b.sealed) for x in b.layers)
            assert len(b.layers) == default_model.config.num_layers
        assert blocks[0].abstract is not None and blocks[1].abstract is None
        restored = backend.new_cache()
        restored.append_blocks(blocks)
        assert restored.length == 300 and restored.sealed_length == 256
        a = backend.forward(ids[300:320], live, all_logits=True)
        b = backend.forward(ids[300:320], restored, all_logits=True)
        assert np.array_equal(a, b), backend.name


@pytest.mark.slow
def test_truncate_keeps_whole_sealed_blocks(default_model):
    ids = np.array(default_model.tokenizer.encode("One two three four five six seven eight. " * 40))
    for backend in _backends(default_model, 4):
        cache = backend.new_cache()
        backend.forward(ids[:300], cache)
        assert cache.truncate(280) == 280  # inside the float16 tail: exact
        assert cache.truncate(100) == 0  # inside a sealed block: recompute that block
        cache2 = backend.new_cache()
        backend.forward(ids[:300], cache2)
        blocks = cache2.blocks()
        rebuilt = backend.new_cache()
        rebuilt.append_blocks(blocks)
        assert rebuilt.truncate(270) == 270
        a = backend.forward(ids[270:280], rebuilt, all_logits=True)
        b = backend.forward(
            ids[270:280], cache2 if cache2.truncate(270) == 270 else None, all_logits=True
        )
        np.testing.assert_array_equal(a, b)


def test_caches_move_between_backends(default_model):
    backends = _backends(default_model, 4)
    if len(backends) < 2:
        pytest.skip("mlx not installed")
    ids = np.array(default_model.tokenizer.encode(QUESTION))
    n = len(ids) - 3
    for src, dst in ((backends[0], backends[1]), (backends[1], backends[0])):
        cache = src.new_cache()
        src.forward(ids[:n], cache)
        moved = dst.new_cache()
        moved.append_blocks(cache.blocks())
        own = dst.new_cache()
        dst.forward(ids[:n], own)
        a = dst.forward(ids[n:], moved, all_logits=True)
        b = dst.forward(ids[n:], own, all_logits=True)
        assert (a.argmax(-1) == b.argmax(-1)).all(), f"{src.name} -> {dst.name}"


def test_mismatched_blocks_are_refused(default_model):
    from edge_infer.backends.torch.backend import TorchBackend

    q4 = TorchBackend(default_model, device="cpu", kv_bits=4)
    q8 = TorchBackend(default_model, device="cpu", kv_bits=8)
    ids = np.arange(300) % 1000 + 10
    cache = q4.new_cache()
    q4.forward(ids, cache)
    with pytest.raises(ValueError, match="8-bit"):
        q8.new_cache().append_blocks(cache.blocks())


def test_default_q4_kv_still_answers(default_model):
    from edge_infer.engine import Engine

    bits = 4
    for backend in _backends(default_model, bits):
        eng = Engine(default_model, backend)
        reply = eng.chat(
            [{"role": "user", "content": "What is the capital of France?"}],
            temperature=0,
            max_tokens=16,
        )
        assert "Paris" in reply, (backend.name, bits, reply)


@pytest.mark.slow
def test_exported_blocks_do_not_change_when_the_cache_goes_on(default_model):
    """Blocks live on in agents, forks and pending saves while the cache that exported them
    keeps running: filling the next block, or rewriting after a truncation, must not show
    through."""
    ids = np.array(default_model.tokenizer.encode("The quick brown fox jumps. " * 80))
    other = ids[::-1].copy()
    for backend in _backends(default_model, 4):
        cache = backend.new_cache()
        backend.forward(ids[:100], cache)
        tail = cache.blocks()  # float16, open block
        backend.forward(ids[100:300], cache)  # seals block 0, starts block 1
        sealed = cache.blocks()[0]
        frozen = [np.array(x.keys, copy=True) for x in tail[0].layers]
        frozen_q = [np.array(x.keys.packed, copy=True) for x in sealed.layers]
        assert cache.truncate(50) == 0  # inside the sealed block: rewritten from scratch
        backend.forward(other[:300], cache)
        for x, before in zip(tail[0].layers, frozen, strict=True):
            assert np.array_equal(x.keys, before), backend.name
        for x, before in zip(sealed.layers, frozen_q, strict=True):
            assert np.array_equal(x.keys.packed, before), backend.name


@pytest.mark.slow
def test_sealed_4bit_blocks_go_from_mlx_to_torch_and_back(default_model):
    """Sealed 4-bit blocks written by MLX load on torch unchanged; torch's export of them loads
    back on MLX and continues exactly as the cache that wrote them."""
    backends = _backends(default_model, 4)
    if len(backends) < 2:
        pytest.skip("mlx not installed")
    torch_be, mlx_be = backends
    ids = np.array(default_model.tokenizer.encode("The quick brown fox jumps. " * 80))
    written = mlx_be.new_cache()
    mlx_be.forward(ids[:300], written)  # one sealed block and a float16 tail
    blocks = written.blocks()
    on_torch = torch_be.new_cache()
    on_torch.append_blocks(blocks)
    back = mlx_be.new_cache()
    back.append_blocks(on_torch.blocks())
    for a, b in zip(blocks, back.blocks(), strict=True):
        for x, y in zip(a.layers, b.layers, strict=True):
            if a.sealed:
                assert np.array_equal(x.keys.packed, y.keys.packed)
                assert np.array_equal(x.values.scales, y.values.scales)
            else:
                assert np.array_equal(x.keys, y.keys) and np.array_equal(x.values, y.values)
    tokens = {}
    for name, cache in (("written", written), ("back", back)):
        out, tok = [], int(ids[300])
        for _ in range(6):
            logits = mlx_be.forward(np.array([tok]), cache)
            tok = int(logits.argmax())
            out.append((tok, logits))
        tokens[name] = out
    for (ta, la), (tb, lb) in zip(tokens["written"], tokens["back"], strict=True):
        assert ta == tb and np.array_equal(la, lb)
    own = torch_be.new_cache()
    torch_be.forward(ids[:300], own)
    a = torch_be.forward(ids[300:320], on_torch, all_logits=True)
    b = torch_be.forward(ids[300:320], own, all_logits=True)
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
