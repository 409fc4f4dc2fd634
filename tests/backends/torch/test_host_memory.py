"""Huge-page CPU buffers and carving one buffer into many tensors."""

from __future__ import annotations

import mmap

import pytest
import torch

from edge_infer.backends.torch.host_memory import (
    ALIGN,
    HUGE_PAGE,
    carve,
    carved_nbytes,
    empty_host,
)


@pytest.mark.parametrize("shape", [(3, 5), (4, HUGE_PAGE // 4 + 7)])
def test_empty_host_gives_a_writable_tensor_of_the_shape(shape):
    t = empty_host(shape, torch.float32)
    assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous()
    t.fill_(2.5)
    assert float(t.sum()) == 2.5 * t.numel()


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no huge-page advice here")
def test_large_buffers_start_on_a_huge_page_boundary():
    t = empty_host((HUGE_PAGE + 1,), torch.uint8)
    assert t.data_ptr() % HUGE_PAGE == 0


def test_empty_host_inside_inference_mode_is_a_normal_tensor():
    with torch.inference_mode():
        t = empty_host((HUGE_PAGE,), torch.uint8)
    t.zero_()  # would raise for an inference tensor
    assert not t.is_inference()


def test_carve_lays_tensors_out_aligned_and_disjoint():
    specs = [((3, 7), torch.int32), ((5,), torch.float16), ((2, 2, 3), torch.float32)]
    buf = torch.zeros(carved_nbytes(specs), dtype=torch.uint8)
    parts = carve(buf, specs)
    for (shape, dtype), t in zip(specs, parts, strict=True):
        assert t.shape == shape and t.dtype == dtype
        assert (t.data_ptr() - buf.data_ptr()) % ALIGN == 0
        t.view(torch.uint8).fill_(255)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in parts)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # disjoint
    assert int((buf != 0).sum()) == sum(t.numel() * t.element_size() for t in parts)


def test_carve_refuses_a_small_or_typed_buffer():
    specs = [((4,), torch.float32)]
    with pytest.raises(ValueError, match="too small"):
        carve(torch.empty(8, dtype=torch.uint8), specs)
    with pytest.raises(ValueError, match="uint8"):
        carve(torch.empty(64, dtype=torch.float32), specs)
