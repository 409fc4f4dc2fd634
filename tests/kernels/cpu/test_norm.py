"""RMSNorm of row blocks (query/key heads, outputs added into the residual) against torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edge_infer.kernels import cpu as cpu_kernels


@pytest.fixture(scope="module")
def kernel():
    module = cpu_kernels.load()
    if module is None:
        pytest.skip("the CPU kernels cannot be built here")
    return module


def test_head_blocks_are_normed_in_place_and_the_rest_left(kernel):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5 * 36 + 12, generator=gen) * 3
    w = torch.rand(36, generator=gen) + 0.5
    want = x.clone()
    heads = want[:, 36 : 4 * 36].reshape(7, 3, 36)
    want[:, 36 : 4 * 36] = F.rms_norm(heads, (36,), w, 1e-6).reshape(7, -1)
    got = kernel.rms_norm_blocks(x, 36, 3, w, 1e-6, None)
    assert got.data_ptr() == x.data_ptr()
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)


def test_a_strided_view_of_the_rows(kernel):
    x = torch.randn(4, 100)
    w = torch.rand(16) + 0.5
    view = x[:, 20:84]  # rows 100 apart
    want = F.rms_norm(view.reshape(4, 4, 16), (16,), w, 1e-5).reshape(4, 64)
    kernel.rms_norm_blocks(view, 0, 4, w, 1e-5, None)
    torch.testing.assert_close(x[:, 20:84], want, rtol=1e-5, atol=1e-5)


def test_added_into_out_leaves_x(kernel):
    x = torch.randn(300, 640)
    w = torch.rand(640) + 0.5
    base = torch.randn(300, 640)
    out, before = base.clone(), x.clone()
    kernel.rms_norm_blocks(x, 0, 1, w, 1e-6, out)
    torch.testing.assert_close(out, base + F.rms_norm(x, (640,), w, 1e-6), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, before)


def test_blocks_past_the_row_are_refused(kernel):
    with pytest.raises(RuntimeError, match="fit in a row"):
        kernel.rms_norm_blocks(torch.zeros(2, 64), 32, 2, torch.ones(32), 1e-6, None)
