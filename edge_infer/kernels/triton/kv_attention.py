"""One new token per sequence attending over its KV cache as stored, in Triton.

The contract of the CPU kernel's ``attend_new_token``: each sequence's token K/V is written
(as float16) into its tail row ``length - 1``, then its query heads attend over all its
tokens. Sealed rows are 4/8-bit codes of ``x @ R`` (affine groups along ``head_dim``, float16
scales and biases), decoded in registers and scored against ``q @ R^T``; their weighted sum
stays in the rotated domain and is turned back (``@ R``) once at the end. Tail rows are
float16 and are read as they are.

The tokens of a (sequence, kv head) are split into runs of fixed length handled by separate
programs, so a long cache keeps the GPU busy even for one sequence; a second small kernel
merges the runs' partial softmax sums. Layouts (contiguous along the last dimension):

    packed  int32 [n_kv, cap, D*bits/32]; scales, biases float16 [n_kv, cap, D/group]
    tail    float16 [n_kv, tail_cap, D]  (tail row r holds token tail_offset + r)
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

# per sequence: the addresses kp, ks, kb, vp, vs, vb, kt, vt, then
# cap, tail_cap, sealed, length, tail_offset (as the CPU kernel takes them)
_POINTERS, _META = 8, 5
_LAYOUT = 6  # TorchKVCache.kernel_layout's values per sequence: _META, then the window
_FIELDS = _POINTERS + _META
# tokens per run: a sequence's runs (and so its result, to the bit) depend on its own length
# only, never on the batch it is decoded in; 16K tokens over 32 kv heads make 1024 programs
_RUN_TOKENS = 512
# elements of the [heads, rows, head_dim] products a program holds at once: at 2048 (16 rows
# of 128) ptxas gives sm_90 about 120 registers a thread and no spills; 4096 takes over 200.
# Triton's interpreter (tests on the CPU) has no registers to spare: larger tiles just run faster
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
_TILE_ELEMENTS = 16384 if _INTERPRETED else 2048


@triton.jit
def _decoded(
    packed, scales, biases, rows, valid, D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr
):
    """Stored rows ``rows`` [N] decoded to float32 [N, D], still in the rotated domain."""
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = D // PER_WORD
    GROUPS: tl.constexpr = D // GROUP
    dims = tl.arange(0, D)
    words = tl.load(
        packed + rows[:, None] * WORDS + (dims // PER_WORD)[None, :], mask=valid[:, None], other=0
    )
    codes = (words >> ((dims % PER_WORD) * BITS)[None, :]) & ((1 << BITS) - 1)
    at = rows[:, None] * GROUPS + (dims // GROUP)[None, :]
    s = tl.load(scales + at, mask=valid[:, None], other=0.0).to(tl.float32)
    b = tl.load(biases + at, mask=valid[:, None], other=0.0).to(tl.float32)
    return codes.to(tl.float32) * s + b


@triton.jit(do_not_specialize=["run_length"])
def _attend_runs(
    q_ptr,
    k_ptr,
    v_ptr,
    table,
    rt_ptr,
    part_m,
    part_l,
    part_rot,
    part_plain,
    run_length,
    scale,
    N_KV: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D_CHUNK: tl.constexpr,
):
    """One run of tokens of one (sequence, kv head): its G query heads' running max, softmax
    total and weighted value sums (rotated and plain), unnormalized."""
    item = tl.program_id(0)  # sequence * N_KV + kv head
    run = tl.program_id(1)
    n_runs = tl.num_programs(1)
    seq = item // N_KV
    h = item % N_KV
    row = table + seq * 13  # _FIELDS
    cap = tl.load(row + 8)
    tail_cap = tl.load(row + 9)
    sealed = tl.load(row + 10)
    n = tl.load(row + 11)
    tail_offset = tl.load(row + 12)
    kt = tl.load(row + 6).to(tl.pointer_type(tl.float16))
    vt = tl.load(row + 7).to(tl.pointer_type(tl.float16))

    heads = tl.arange(0, G_PAD)
    dims = tl.arange(0, D)
    live = heads < G
    q_rows = item * G + heads  # query head h * G + g of sequence seq
    q = tl.load(q_ptr + q_rows[:, None] * D + dims[None, :], mask=live[:, None], other=0.0)
    q = q * scale
    lo = run.to(tl.int64) * run_length
    hi = tl.minimum(lo + run_length, n)
    last = n - 1  # the new token, not yet in the tail

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc_plain = tl.zeros([G_PAD, D], tl.float32)
    acc_rot = tl.zeros([G_PAD, D], tl.float32)

    if BITS < 16:
        # sealed rows: scores against q @ R^T, values summed in the rotated domain
        kp = tl.load(row + 0).to(tl.pointer_type(tl.int32))
        ks = tl.load(row + 1).to(tl.pointer_type(tl.float16))
        kb = tl.load(row + 2).to(tl.pointer_type(tl.float16))
        vp = tl.load(row + 3).to(tl.pointer_type(tl.int32))
        vs = tl.load(row + 4).to(tl.pointer_type(tl.float16))
        vb = tl.load(row + 5).to(tl.pointer_type(tl.float16))
        chunk = tl.arange(0, D_CHUNK)
        q_rot = tl.zeros([G_PAD, D], tl.float32)
        for d0 in range(0, D, D_CHUNK):
            qc = tl.load(
                q_ptr + q_rows[:, None] * D + (d0 + chunk)[None, :], mask=live[:, None], other=0.0
            )
            rc = tl.load(rt_ptr + (d0 + chunk)[:, None] * D + dims[None, :])
            q_rot += tl.sum((qc * scale)[:, :, None] * rc[None, :, :], axis=1)
        stop = tl.minimum(hi, sealed)
        for start in range(lo, stop, BLOCK_N):
            toks = start + tl.arange(0, BLOCK_N)
            valid = toks < stop
            rows = h * cap + toks
            keys = _decoded(kp, ks, kb, rows, valid, D, BITS, GROUP)
            s = tl.sum(q_rot[:, None, :] * keys[None, :, :], axis=2)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            values = _decoded(vp, vs, vb, rows, valid, D, BITS, GROUP)
            acc_rot = acc_rot * alpha[:, None] + tl.sum(p[:, :, None] * values[None, :, :], axis=1)
            acc_plain = acc_plain * alpha[:, None]
            m_i = m_new

    # float16 tail rows before the new token
    stop = tl.minimum(hi, last)
    for start in range(tl.maximum(lo, sealed), stop, BLOCK_N):
        toks = start + tl.arange(0, BLOCK_N)
        valid = toks < stop
        at = (h * tail_cap + toks - tail_offset)[:, None] * D + dims[None, :]
        keys = tl.load(kt + at, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        values = tl.load(vt + at, mask=valid[:, None], other=0.0).to(tl.float32)
        acc_plain = acc_plain * alpha[:, None] + tl.sum(p[:, :, None] * values[None, :, :], axis=1)
        acc_rot = acc_rot * alpha[:, None]
        m_i = m_new

    # the new token: stored as float16 into its tail row, and attended as stored
    if (last >= lo) & (last < hi):
        at = (h * tail_cap + last - tail_offset) * D + dims
        k_new = tl.load(k_ptr + item * D + dims).to(tl.float16)
        v_new = tl.load(v_ptr + item * D + dims).to(tl.float16)
        tl.store(kt + at, k_new)
        tl.store(vt + at, v_new)
        s_new = tl.sum(q * k_new.to(tl.float32)[None, :], axis=1)
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp(m_i - m_new)
        p_new = tl.exp(s_new - m_new)
        l_i = l_i * alpha + p_new
        acc_plain = acc_plain * alpha[:, None] + p_new[:, None] * v_new.to(tl.float32)[None, :]
        acc_rot = acc_rot * alpha[:, None]
        m_i = m_new

    part = (item * n_runs + run) * G_PAD + heads
    tl.store(part_m + part, m_i)
    tl.store(part_l + part, l_i)
    tl.store(part_plain + part[:, None] * D + dims[None, :], acc_plain)
    if BITS < 16:
        tl.store(part_rot + part[:, None] * D + dims[None, :], acc_rot)


@triton.jit(do_not_specialize=["n_runs"])
def _merge_runs(
    part_m,
    part_l,
    part_rot,
    part_plain,
    r_ptr,
    out_ptr,
    n_runs,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BITS: tl.constexpr,
    D_CHUNK: tl.constexpr,
):
    """The runs of one (sequence, kv head) merged: (rotated sum @ R + plain sum) / total."""
    item = tl.program_id(0)
    heads = tl.arange(0, G_PAD)
    dims = tl.arange(0, D)
    first = item * n_runs * G_PAD + heads
    top = tl.full([G_PAD], float("-inf"), tl.float32)
    for r in range(0, n_runs):
        top = tl.maximum(top, tl.load(part_m + first + r * G_PAD))
    total = tl.zeros([G_PAD], tl.float32)
    out = tl.zeros([G_PAD, D], tl.float32)
    for r in range(0, n_runs):
        part = first + r * G_PAD
        w = tl.exp(tl.load(part_m + part) - top)  # 0 for a run without tokens
        total += w * tl.load(part_l + part)
        out += w[:, None] * tl.load(part_plain + part[:, None] * D + dims[None, :])
    if BITS < 16:
        chunk = tl.arange(0, D_CHUNK)
        for e0 in range(0, D, D_CHUNK):
            rot = tl.zeros([G_PAD, D_CHUNK], tl.float32)
            for r in range(0, n_runs):
                part = first + r * G_PAD
                w = tl.exp(tl.load(part_m + part) - top)
                rot += w[:, None] * tl.load(part_rot + part[:, None] * D + (e0 + chunk)[None, :])
            rc = tl.load(r_ptr + (e0 + chunk)[:, None] * D + dims[None, :])
            out += tl.sum(rot[:, :, None] * rc[None, :, :], axis=1)
    out = out / total[:, None]
    at = (item * G + heads)[:, None] * D + dims[None, :]
    tl.store(out_ptr + at, out, mask=(heads < G)[:, None])


def _power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def attend_new_token(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pointers: list[int],
    metas: list[int],
    rotation: torch.Tensor,
    rotation_t: torch.Tensor,
    bits: int,
    group: int,
    *,
    tokens_per_run: int | None = None,
) -> torch.Tensor:
    """q float32 [B, n_q, D] (rope applied); k, v float32 [B, n_kv, D]: each sequence's new
    token, written as float16 into its tail row ``length - 1`` before attending. ``pointers``
    [8 B] and ``metas`` [6 B] as ``TorchKVCache.kernel_layout`` gives them; ``rotation`` (R)
    and its transpose float32 [D, D] on q's device. Returns softmax(q K^T / sqrt(D)) V,
    float32 [B, n_q, D]. ``tokens_per_run`` overrides how the tokens are split (tests)."""
    B, n_q, D = q.shape
    n_kv = k.shape[1]
    if q.dtype != torch.float32 or not q.is_contiguous():
        raise ValueError("q must be contiguous float32 [B, n_q, D]")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != torch.float32 or not x.is_contiguous() or x.shape != (B, n_kv, D):
            raise ValueError(f"{name} must be contiguous float32 [B, n_kv, D]")
    if n_q % n_kv or len(pointers) != _POINTERS * B or len(metas) != _LAYOUT * B:
        raise ValueError("pointers, metas: 8 and 6 values per sequence")
    if any(metas[_LAYOUT - 1 :: _LAYOUT]):
        raise ValueError("sliding-window layers are not supported by this kernel")
    metas = [x for b in range(B) for x in metas[_LAYOUT * b : _LAYOUT * b + _META]]
    rows = [
        pointers[_POINTERS * b : _POINTERS * (b + 1)] + metas[_META * b : _META * (b + 1)]
        for b in range(B)
    ]
    table = torch.tensor(rows, dtype=torch.int64)
    if q.is_cuda:  # pinned, so the copy queues behind the work before it without a wait
        table = table.pin_memory().to(q.device, non_blocking=True)
    g = n_q // n_kv
    g_pad = _power_of_two(g)
    block = max(16, min(64, _TILE_ELEMENTS // (g_pad * D)))
    d_chunk = max(16, min(D, _TILE_ELEMENTS // (g_pad * D)))  # all powers of two
    longest = max(metas[3::_META])
    items = B * n_kv
    length = -(-(tokens_per_run or _RUN_TOKENS) // block) * block
    n_runs = -(-longest // length)
    quantized = bits < 16
    part_m = torch.empty(items * n_runs * g_pad, device=q.device)
    part_l = torch.empty_like(part_m)
    part_plain = torch.empty(items * n_runs * g_pad, D, device=q.device)
    part_rot = torch.empty_like(part_plain) if quantized else part_plain
    _attend_runs[(items, n_runs)](
        q,
        k,
        v,
        table,
        rotation_t,
        part_m,
        part_l,
        part_rot,
        part_plain,
        length,
        1.0 / math.sqrt(D),
        N_KV=n_kv,
        G=g,
        G_PAD=g_pad,
        D=D,
        BITS=bits,
        GROUP=group if quantized else D,
        BLOCK_N=block,
        D_CHUNK=d_chunk,
    )
    out = torch.empty_like(q)
    _merge_runs[(items,)](
        part_m,
        part_l,
        part_rot,
        part_plain,
        rotation,
        out,
        n_runs,
        G=g,
        G_PAD=g_pad,
        D=D,
        BITS=bits,
        D_CHUNK=d_chunk,
    )
    return out
