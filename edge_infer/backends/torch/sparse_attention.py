"""Decode attention over the selected pages of a :class:`TorchKVCache` (CPU kernel).

Each (sequence, KV head) becomes one row of the kernel's batch: a head attending every page
points at the cache's own buffers; a head attending a selection points at them too, with
the list of its selected sealed rows in order (offloaded layers: at its selected rows
gathered from the tiers), and at the cache's float16 tail, where the kernel writes the new
token. The kernel's arithmetic per head is the same either way, so a selection of every
page computes bit for bit what dense attention computes.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from edge_infer.backends.torch.kv_cache import TorchKVCache
from edge_infer.kernels import cpu as cpu_kernels
from edge_infer.offload.bounds import quest_bounds, scores
from edge_infer.offload.index import SparseState, StepRecord
from edge_infer.offload.selection import (
    always_pages,
    certificate,
    next_pages,
    oracle_pages,
    page_mass,
    query_ranking,
    select_certified,
    select_pages,
    window_pages,
)


def _page_rows(selected: np.ndarray, page: int) -> list[np.ndarray]:
    """Per KV head, the stored rows (int32) of its ``selected`` pages (bool ``[n_kv, pages]``)
    in order, all made at once: the kernel reads them where they lie, no copy of the KV."""
    _, pages = np.nonzero(selected)
    rows = (pages.astype(np.int32)[:, None] * page + np.arange(page, dtype=np.int32)).ravel()
    return np.split(rows, np.cumsum(selected.sum(axis=1) * page)[:-1])


def _tensor_of(x: np.ndarray) -> torch.Tensor:
    """A tensor over gathered rows (packed words as int32: the kernel reads bytes)."""
    return torch.from_numpy(x.view(np.int32) if x.dtype == np.uint32 else x)


def _log_sum_exp(s: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row of ``s`` [n_q, T], log of the sum of exp over the True entries of ``mask``."""
    masked = np.where(mask, s.astype(np.float64), -np.inf)
    top = masked.max(axis=1)
    safe = np.where(np.isfinite(top), top, 0.0)
    return safe + np.log(np.exp(masked - safe[:, None]).sum(axis=1))


def _select(
    cache: TorchKVCache, state: SparseState, layer: int, q: np.ndarray, k_new: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """(selected [n_kv, pages], bounds [n_q, pages], rounds, the ranking [n_kv, pages]
    pages were taken by, None for a quality reference or when nothing needs it) of one
    sequence's layer."""
    policy, index = state.policy, state.index
    if cache.block_size % policy.page:
        raise ValueError(f"page size {policy.page} does not divide the block size")
    sealed = cache.sealed_length
    covered = index.tokens(layer)
    if covered < sealed:  # pages of the blocks sealed since the last step
        index.extend(layer, cache.sealed_keys(layer, covered, sealed).cpu().numpy())
    lo, hi = index.bounds(layer)
    bounds = quest_bounds(q, lo, hi)
    n_pages = lo.shape[1]
    always = always_pages(n_pages, cache.block_size // policy.page, policy.recent)
    budget = policy.budget_pages(n_pages)
    if policy.select == "window":
        return window_pages(cache.n_kv, always, budget), bounds, 0, None
    if policy.select == "oracle":  # a quality reference: exact scores, a dense pass
        mass = page_mass(_scores_with_new(cache, layer, q, k_new), policy.page, sealed, cache.n_kv)
        return oracle_pages(mass[:, :n_pages], always, budget), bounds, 0, None
    if policy.threshold >= 1.0:
        ranking = query_ranking(bounds, cache.n_kv, policy.per_query, always)
        return select_pages(ranking, always, budget), bounds, 0, ranking
    # the certificate needs the exact softmax total over what is attended
    s = _scores_with_new(cache, layer, q, k_new)
    g = q.shape[0] // cache.n_kv

    def log_z_of(sel: np.ndarray) -> np.ndarray:
        return _log_sum_exp(s, _attended_tokens(sel, policy.page, sealed, s.shape[1], g))

    sizes = np.full(n_pages, policy.page)
    selected, _, rounds = select_certified(policy, bounds, cache.n_kv, always, sizes, log_z_of)
    # the pages to prefetch follow the ranking the selection grew by
    ranking = (
        query_ranking(bounds, cache.n_kv, policy.per_query, always) if policy.prefetch else None
    )
    return selected, bounds, rounds, ranking


def _scores_with_new(cache: TorchKVCache, layer: int, q: np.ndarray, k_new: np.ndarray):
    """Exact scores [n_q, length + 1] of q over the held keys and the new one ``k_new``."""
    keys, _ = cache.readable(layer, cache.length)
    keys = np.concatenate([keys.cpu().numpy(), k_new[:, None].astype(np.float32)], axis=1)
    # the kernel stores the new key as float16 before scoring it
    keys[:, -1] = keys[:, -1].astype(np.float16)
    return scores(q, keys)


def _attended_tokens(selected: np.ndarray, page: int, sealed: int, n: int, g: int) -> np.ndarray:
    """bool [n_q, n]: per query head, the tokens of its KV head's selected pages and the tail."""
    tokens = np.repeat(np.repeat(selected, page, axis=1), g, axis=0)[:, :sealed]
    tail = np.ones((tokens.shape[0], n - sealed), dtype=bool)
    return np.concatenate([tokens, tail], axis=1)


def attend_sparse(
    caches: list[TorchKVCache], layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """As ``attend_new_tokens``: one new token per cache, q [B, n_q, D], k and v
    [B, n_kv, D] -> [B, n_q, D]; a cache with a :class:`SparseState` attends (past its dense
    layers) only the pages its policy selects, plus the float16 tail."""
    first = caches[0]
    if not first.quantized:
        raise ValueError("sparse attention needs a quantized cache (kv_bits 4 or 8)")
    kernel = cpu_kernels.load() if first.device.type == "cpu" else None
    B, n_q, D = q.shape
    n_kv = k.shape[1]
    g = n_q // n_kv
    q32 = q.float().contiguous()
    k32, v32 = k.float().contiguous(), v.float().contiguous()
    ptrs: list[int] = []
    metas: list[int] = []
    row_lists: list[int] = []  # per kernel row: the address of its list of rows, 0: all
    gathered: list = []  # tensors and lists of rows, alive until the kernel has run
    records: list[tuple[int, StepRecord, np.ndarray]] = []
    plans: list[tuple[np.ndarray | None, int]] = []
    q_np, k_np = q32.cpu().numpy(), k32.cpu().numpy()
    for b, cache in enumerate(caches):
        if cache.is_offloaded(layer):
            parts, tails = [], cache.tails(layer)
        else:
            parts, tails = cache.stored_parts(layer)
        length, sealed, window = cache.length, cache.sealed_length, cache.windows[layer]
        state = cache.sparse
        selected, page, ahead = None, 0, None
        if state is not None and sealed and not window and layer >= state.policy.dense_layers:
            qb, page = q_np[b], state.policy.page
            t0 = time.perf_counter()
            selected, bounds, rounds, ranking = _select(cache, state, layer, qb, k_np[b])
            if ranking is not None and state.policy.prefetch and cache.is_offloaded(layer):
                ahead = next_pages(ranking, selected, state.policy.prefetch)
            state.select_seconds += time.perf_counter() - t0
            if state.record or state.measure:
                rec = StepRecord(length, layer, selected, qb.copy() if state.record else None)
                rec.rounds = rounds
                records.append((b, rec, bounds))
        elif state is not None and state.record and sealed:
            rec = StepRecord(length, layer, np.ones((n_kv, 0), bool), q_np[b].copy())
            state.log.append(rec)
        plans.append((selected, page))
        if kernel is None:
            continue
        tiers = cache.tiers if cache.is_offloaded(layer) else None
        stored = None
        if tiers is None and selected is not None and not selected.all():
            stored = _page_rows(selected, page)
            gathered.append(stored)
        if tiers is not None:  # the pages come from host memory or disk, all heads at once
            if page and page != tiers.page:
                raise ValueError(f"pages of {page} tokens, tiers of {tiers.page}")
            chosen = selected
            if chosen is None:
                chosen = np.ones((n_kv, sealed // tiers.page), dtype=bool)
            rows, counts = tiers.gather_layer(layer, chosen)
            if ahead is not None and ahead.any():  # read while this step computes
                tiers.prefetch(layer, ahead)
            tiered = [_tensor_of(x) for x in rows]
            ends = np.cumsum(counts) * tiers.page
        for h in range(n_kv):
            tail_ptrs = [tails[0][h].data_ptr(), tails[1][h].data_ptr()]
            if tiers is not None:  # the head's gathered rows as a sequence of their own
                a0 = int(ends[h - 1]) if h else 0
                part = [t[a0 : int(ends[h])] for t in tiered]  # contiguous: whole rows
                gathered += part
                n = part[0].shape[0]
                ptrs += [t.data_ptr() for t in part] + tail_ptrs
                metas += [n, cache.block_size, n, n + length - sealed + 1, n, 0]
                row_lists.append(0)
                continue
            # the cache's own rows: all of them, or its selected ones where they are stored
            # (a selection is never made in a window layer)
            listed = None if stored is None or selected is None or selected[h].all() else stored[h]
            n = sealed if listed is None else len(listed)
            ptrs += cache.head_pointers(layer, h) + tail_ptrs
            metas += [parts[0].shape[1], cache.block_size, n, n + length - sealed + 1, n, window]
            row_lists.append(0 if listed is None else listed.ctypes.data)
    if kernel is None:
        out = _attend_plain(caches, layer, q32, k32, v32, plans)
    else:
        out = kernel.attend_new_token(
            q32.view(B * n_kv, g, D),
            k32.view(B * n_kv, 1, D),
            v32.view(B * n_kv, 1, D),
            ptrs,
            metas,
            first.rotation,
            first.rotation_t,
            first.layer_bits[layer],
            first.group_size,
            row_lists,
        )
    for b, rec, bounds in records:
        cache = caches[b]
        state = cache.sparse
        assert state is not None
        if state.measure:
            _measure(cache, layer, q_np[b], bounds, rec, state.policy.page)
        state.log.append(rec)
    return out.view(B, n_q, D)


def _attend_plain(
    caches: list[TorchKVCache],
    layer: int,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plans: list[tuple[np.ndarray | None, int]],
) -> torch.Tensor:
    """Plain torch where the kernel is not available: each cache stores its new token, then
    each of its KV heads attends its selected sealed rows (all if None), the tail and it."""
    outs = []
    for b, (cache, (selected, page)) in enumerate(zip(caches, plans, strict=True)):
        cache.update(layer, k[b, :, None], v[b, :, None])
        end = cache.length + 1
        keys, values = cache.readable(layer, end)
        n_q, d = q.shape[1:]
        g = n_q // cache.n_kv
        window = cache.windows[layer]
        out = torch.empty_like(q[b])
        for h in range(cache.n_kv):
            keep = torch.ones(end, dtype=torch.bool)
            if window:
                keep[: max(0, end - window)] = False
            if selected is not None:
                keep[: cache.sealed_length] = torch.from_numpy(np.repeat(selected[h], page))
            keep = keep.to(keys.device)
            s = q[b, h * g : (h + 1) * g] @ keys[h, keep].T / d**0.5
            out[h * g : (h + 1) * g] = torch.softmax(s, dim=-1) @ values[h, keep]
        outs.append(out)
    return torch.stack(outs)


def _measure(
    cache: TorchKVCache, layer: int, q: np.ndarray, bounds: np.ndarray, rec: StepRecord, page: int
) -> None:
    """The step's certificate and the attention mass its skipped pages actually held (exact
    scores over every key, the new one now stored)."""
    keys, _ = cache.readable(layer, cache.length + 1)
    s = scores(q, keys.cpu().numpy())
    g = q.shape[0] // cache.n_kv
    sealed = cache.sealed_length
    attended = _attended_tokens(rec.selected, page, sealed, s.shape[1], g)
    log_all = _log_sum_exp(s, np.ones_like(attended))
    rec.skipped_mass = np.exp(_log_sum_exp(s, ~attended) - log_all)
    sizes = np.full(bounds.shape[1], page)
    skipped_q = ~np.repeat(rec.selected, g, axis=0)
    rec.certificate = certificate(_log_sum_exp(s, attended), bounds, skipped_q, sizes)
