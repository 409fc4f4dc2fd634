"""Attention over :class:`TorchKVCache` layers as they are stored (quantized blocks and a
float16 tail), without a float32 copy of the whole cache.

* One new token per sequence (decoding, alone or batched): the CPU kernel stores the token's
  K/V and reads the 4/8-bit rows and the float16 tail directly (:mod:`edge_infer.kernels.cpu`),
  all sequences in one call; on CUDA the Triton kernel does the same
  (:mod:`edge_infer.kernels.triton`).
* Several new tokens (prefill chunks): the kernel's chunk path, which decodes each key and
  value once for 32 (token, query head) rows at a time. Without the kernel the layer's rows
  are written into a per-thread float32 scratch buffer and handed to torch's fused
  attention, either as attention reads them (sealed rows rotated back) or, when fewer rows
  need rotating that way, in the stored rotated domain (the tail, the query and the output
  rotated instead).

:func:`attend_reference` is the plain-torch computation both are tested against. Where no
kernel is available (no compiler or no Triton, ``EDGE_INFER_KERNELS=off``, a head size it does
not take) attention takes the scratch path; on CUDA prefill chunks always do.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from edge_infer.backends.torch.host_memory import empty_host
from edge_infer.backends.torch.kv_cache import TorchKVCache
from edge_infer.backends.torch.sparse_attention import attend_sparse
from edge_infer.kernels import cpu as cpu_kernels
from edge_infer.kernels import triton as triton_kernels

_scratch = threading.local()


def _kernel(cache: TorchKVCache):
    """The CPU kernel module when it can serve this cache's layout, else None."""
    if cache.device.type != "cpu" or cache.head_dim % 32:
        return None
    if cache.quantized and (cache.group_size % 32 or cache.head_dim // cache.group_size > 16):
        return None
    return cpu_kernels.load()


def _one_token_kernel(cache: TorchKVCache):
    """The kernel module for one new token per sequence (C++ on the CPU, Triton on CUDA)
    when it can serve this cache's layout, else None."""
    if cache.device.type == "cuda":
        if any(cache.windows):  # the Triton kernel attends every token: no sliding windows
            return None
        if not triton_kernels.accepts(cache.head_dim, cache.bits, cache.group_size):
            return None
        return triton_kernels.load()
    return _kernel(cache)


def _scratch_pair(n_kv: int, length: int, dim: int, device: torch.device) -> tuple:
    """This thread's float32 scratch for K and V, at least [n_kv, length, dim]."""
    have = getattr(_scratch, "pair", None)
    if (
        have is None
        or have[0].device != device
        or have[0].shape[0] != n_kv
        or (have[0].shape[1] < length or have[0].shape[2] != dim)
    ):
        size = max(length, 2 * have[0].shape[1] if have is not None else 0, 512)
        have = tuple(
            empty_host((n_kv, size, dim), torch.float32)
            if device.type == "cpu"
            else torch.empty(n_kv, size, dim, device=device)
            for _ in range(2)
        )
        _scratch.pair = have
    return have


def attend_tokens(cache: TorchKVCache, layer: int, q: torch.Tensor) -> torch.Tensor:
    """q [n_q, T, D] (rope applied) for the T tokens just stored after ``cache.length``
    -> attention output [n_q, T, D]; each token sees the tokens before it and itself (only
    the layer's window of them on a sliding-window layer). The caller has stored the T
    tokens (``cache.update``) but not yet committed them."""
    n_q, T, D = q.shape
    start = cache.length
    end = start + T
    kernel = _kernel(cache)
    if kernel is not None:
        pointers, meta = cache.kernel_layout(layer, end)
        return kernel.attend_chunk(
            q.contiguous(),
            pointers,
            meta,
            start,
            cache.n_kv,
            cache.rotation,
            cache.rotation_t,
            cache.layer_bits[layer],
            cache.group_size,
        )
    window = cache.windows[layer]
    keys, values = _scratch_pair(cache.n_kv, end, D, cache.device)
    # rows are rotated either way: the sealed ones back, or the tail, query and output
    sealed = min(cache.sealed_length, end) if cache.quantized else 0
    rotated = sealed > 0 and sealed * cache.n_kv > (end - sealed) * cache.n_kv + T * n_q
    cache.stored_rows(layer, end, keys, values, rotated)
    rot = cache.rotation
    qs = q @ rot.T if rotated else q
    out = _causal_attention(qs, keys[:, :end], values[:, :end], start, window)
    return out @ rot if rotated else out


def attend_new_tokens(
    caches: list[TorchKVCache], layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """One new token per cache: store its k, v [B, n_kv, D] after the held tokens and attend
    with q [B, n_q, D] over all of them -> output [B, n_q, D]. The caller commits the token
    (``cache.advance(1)``) after the last layer; ``cache.reserve_next()`` comes first."""
    if any(cache.sparse is not None for cache in caches):
        return attend_sparse(caches, layer, q, k, v)
    first = caches[0]
    kernel = _one_token_kernel(first)
    if kernel is None:
        outs = []
        for b, cache in enumerate(caches):
            cache.update(layer, k[b, :, None], v[b, :, None])
            outs.append(attend_tokens(cache, layer, q[b, :, None])[:, 0])
        return torch.stack(outs)
    pointers: list[int] = []
    metas: list[int] = []
    for cache in caches:
        ptrs, meta = cache.kernel_layout(layer, cache.length + 1)
        pointers += ptrs
        metas += meta
    return kernel.attend_new_token(
        q.contiguous(),
        k.float().contiguous(),
        v.float().contiguous(),
        pointers,
        metas,
        first.rotation,
        first.rotation_t,
        first.layer_bits[layer],
        first.group_size,
    )


def attend_reference(cache: TorchKVCache, layer: int, q: torch.Tensor) -> torch.Tensor:
    """Plain-torch attention of q [n_q, T, D] for the T tokens just stored after
    ``cache.length`` over :meth:`TorchKVCache.readable`: what the fast paths compute."""
    start = cache.length
    keys, values = cache.readable(layer, start + q.shape[1])
    return _causal_attention(q, keys, values, start, cache.windows[layer])


def _causal_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, window: int = 0
) -> torch.Tensor:
    """q [n_q, T, D] of the tokens at ``start..`` over keys/values [n_kv, start + T, D]:
    each query sees the keys up to its own position, and with a ``window`` only the
    ``window`` latest of them. Keys no query of the chunk sees are not read."""
    T = q.shape[1]
    lo = max(0, start - window + 1) if window else 0
    keys, values = keys[:, lo:], values[:, lo:]
    mask = None
    if window and start + T - lo > window:  # some query's window starts after lo
        pos = torch.arange(start, start + T, device=q.device)[:, None]
        key_pos = torch.arange(lo, start + T, device=q.device)[None, :]
        mask = (key_pos <= pos) & (key_pos > pos - window)
    elif T > 1 and start > lo:
        mask = torch.ones(T, start + T - lo, dtype=torch.bool, device=q.device).tril(start - lo)
    return F.scaled_dot_product_attention(
        q[None],
        keys[None],
        values[None],
        attn_mask=mask,
        is_causal=mask is None and T > 1,
        enable_gqa=q.shape[0] != keys.shape[0],
    )[0]
