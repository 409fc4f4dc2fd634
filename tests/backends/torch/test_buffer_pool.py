"""The pool of KV buffers: reuse by shape, byte budget, and tensors usable in and out of
inference mode."""

from __future__ import annotations

import gc

import numpy as np
import torch

from edge_infer.backends.torch.buffer_pool import BufferPool

CPU = torch.device("cpu")


def test_reuses_a_returned_buffer_of_the_same_shape():
    pool = BufferPool(max_bytes=1 << 20)
    a = pool.take((4, 8), torch.float32, CPU)
    pool.give([a])
    assert pool.nbytes == 4 * 8 * 4
    assert pool.take((4, 8), torch.float32, CPU) is a and pool.nbytes == 0
    assert pool.take((4, 8), torch.float32, CPU) is not a  # empty again: a new one


def test_shape_and_dtype_must_match():
    pool = BufferPool(max_bytes=1 << 20)
    a = pool.take((4, 8), torch.float32, CPU)
    pool.give([a])
    assert pool.take((8, 4), torch.float32, CPU) is not a
    assert pool.take((4, 8), torch.float16, CPU) is not a
    assert pool.nbytes == a.numel() * 4


def test_budget_frees_the_oldest_first():
    pool = BufferPool(max_bytes=3 * 400)
    bufs = [torch.empty(100) for _ in range(5)]  # 400 bytes each
    pool.give(bufs)
    assert pool.nbytes == 3 * 400
    kept = [pool.take((100,), torch.float32, CPU) for _ in range(3)]
    assert {id(t) for t in kept} == {id(t) for t in bufs[2:]}


def test_buffers_taken_in_inference_mode_can_be_written_outside_it():
    pool = BufferPool()
    with torch.inference_mode():
        t = pool.take((16,), torch.float32, CPU)
    t[:] = 1.0  # would raise for an inference tensor
    pool.give([t])
    with torch.inference_mode():
        again = pool.take((16,), torch.float32, CPU)
        again.add_(1.0)
    assert again is t and torch.equal(t, torch.full((16,), 2.0))


def test_a_dropped_cache_gives_its_buffers_back(default_model):
    from edge_infer.backends.torch import kv_cache
    from edge_infer.backends.torch.backend import TorchBackend

    backend = TorchBackend(default_model, device="cpu", kv_bits=4)
    kv_cache.POOL.clear()
    cache = backend.new_cache()
    backend.forward(np.arange(300) + 100, cache)
    blocks = cache.blocks()
    del cache
    gc.collect()
    assert kv_cache.POOL.nbytes > 0
    restored = backend.new_cache()
    restored.append_blocks(blocks)  # outside inference mode, into reused buffers
    assert restored.length == 300
    kv_cache.POOL.clear()


def test_finalizers_giving_back_while_the_pool_is_busy_do_not_deadlock():
    """Caches give their buffers back from finalizers, which the garbage collector may run
    in the middle of any pool call on the same thread."""
    import threading
    import weakref

    pool = BufferPool(max_bytes=64 * 4 * 8)

    class Holder:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the cyclic collector frees it
            weakref.finalize(self, pool.give, [torch.empty(64)])

    def churn() -> None:
        for _ in range(300):
            Holder()
            pool.give([torch.empty(64)])
            pool.take((64,), torch.float32, CPU)

    old = gc.get_threshold()
    gc.set_threshold(1)  # collect at nearly every allocation
    try:
        t = threading.Thread(target=churn, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "the pool deadlocked"
    finally:
        gc.set_threshold(*old)
    assert pool.nbytes <= pool.max_bytes
