"""Sparse decode over page selections: how well Quest bounds find the pages that matter, and
what attending only them costs in quality, on the default model over real English text.

    python -m benchmarks.offload [--tokens 8192] [--steps 256] [--pages 256,64,32]
                                 [--budget 0.25] [--record 32] [--policy "select=oracle" ...]
                                 [--json PATH]
    python -m benchmarks.offload --tiers [--tokens 8192] [--steps 64] [--budgets 0.25,0.5]
                                 [--pool 0.25] [--prefetch 8] [--model gemma3-270m]
    python -m benchmarks.offload --passkey [--trials 10] [--depths 0.1,0.5,0.9]
                                 [--policy "page=32 budget=0.25 ..."]

One prefill of ``--tokens - --steps`` tokens of the Python docs (4-bit KV, torch CPU); every
run after it starts from a copy of that cache (restored from its blocks).

1. Page recall. ``--record`` teacher-forced decode steps record the real queries of every
   layer. For each page size, per (step, layer >= 2, KV head): the pages of the top
   ``budget`` share by true attention mass (the oracle) against the top pages by Quest bound:
   recall of the oracle's pages, attention mass the bound's pages hold vs the oracle's, the
   mass the full policy (first and last sealed block always, then pages by bound) skips and
   its certificate, what the oracle and sinks+window skip under the same budget, and the
   overlap of the bound's selection from one step to the next.
2. Quality. ``--steps`` teacher-forced steps, dense and sparse (each ``--policy``: fields of
   ``SparsePolicy`` as ``key=value``; by default Quest bounds, the oracle and sinks+window at
   ``--budget``, and the default policy) on the same tokens: the share of sealed pages the
   sparse layers attended, top-1 agreement and KL(dense || sparse) of the next-token
   distributions, ms per token (median, p90; runs one after the other on a shared machine:
   read ratios only), and whether an all-pages budget gives the dense logits bit for bit.

``--tiers``: where the KV lives, modes interleaved step by step over ``--steps``
teacher-forced tokens: dense in RAM; dense streamed from disk (layers past the first two
offloaded with no pool, the block files' pages dropped from the page cache before each step
with ``posix_fadvise``); sparse in RAM (a share of the pages by Quest bound); sparse
tiered (the same pages from a pool of ``--pool`` of the KV and the block files, page cache
dropped likewise; and again with ``--prefetch`` pages per KV head ranked next read into
the pool on the I/O thread, a step timed until that is done), for each of ``--budgets``.
Then time to first token of the agent on disk: a full restore (hash, read, copy) against
an offloaded resume (map the files, load the page index, read the pages the first step
selects), page cache dropped before each.

``--passkey``: a 5-digit key hidden at each ``--depths`` share of ``--tokens`` tokens of
filler; after a dense prefill of the context, the question is fed and the answer greedily
decoded token by token, dense and sparse (the first ``--policy``, else the default) from the
same prefilled cache: retrieval accuracy per depth.
"""

from __future__ import annotations

import argparse
import dataclasses
import mmap
import os
import re
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    corpus_text,
    machine,
    passkey_prompt,
    print_table,
    temporary_dir,
    write_results,
)
from edge_infer.backends.torch.backend import TorchBackend
from edge_infer.cache_store import AgentStore, KVFormat
from edge_infer.cache_store.blocks import buffer_root
from edge_infer.cache_store.kv_format import layer_bits
from edge_infer.generation.sampling import log_softmax
from edge_infer.models.default_model import default_model_path
from edge_infer.models.fingerprint import Fingerprint
from edge_infer.models.loader import load_model
from edge_infer.offload import (
    SparsePolicy,
    SparseState,
    always_pages,
    certificate,
    group_max,
    oracle_pages,
    page_bounds,
    page_mass,
    quest_bounds,
    select_pages,
    window_pages,
)
from edge_infer.offload.index import PageIndex
from edge_infer.offload.settings import OffloadSettings
from edge_infer.offload.tiers import HostPool

DENSE_LAYERS = 2


def corpus_ids(tokenizer, n: int) -> np.ndarray:
    text, chars = corpus_text(), 8 * n
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) > n or chars >= len(text):
            return np.asarray(ids[:n], dtype=np.int64)
        chars *= 2


def restored(backend: TorchBackend, blocks):
    cache = backend.new_cache()
    cache.append_blocks(blocks)
    return cache


def record_queries(backend, blocks, ids, n_layers):
    """Real queries per (step, layer) [n_q, D], and keys per layer as attention reads them."""
    cache = restored(backend, blocks)
    start = cache.length
    policy = SparsePolicy(budget=1.0, dense_layers=0)
    cache.sparse = SparseState.new(policy, n_layers, record=True)
    for tok in ids:
        backend.forward(np.array([tok]), cache)
    qs = np.zeros((len(ids), n_layers) + cache.sparse.log[0].q.shape, np.float32)
    for rec in cache.sparse.log:
        qs[rec.position - start, rec.layer] = rec.q
    keys = [cache.readable(i, cache.length)[0].numpy() for i in range(n_layers)]
    return start, qs, keys


def _lse(s: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row, log of the sum of exp(s) over the True entries of mask (float64)."""
    m = np.where(mask, s, -np.inf)
    top = m.max(axis=1)
    return top + np.log(np.exp(m - top[:, None]).sum(axis=1))


def page_recall(start, qs, keys, page, budget, block_size):
    """Averages over (step, layer >= DENSE_LAYERS, KV head) of the recall metrics."""
    steps, n_layers, n_q, d = qs.shape
    n_kv = keys[0].shape[0]
    g = n_q // n_kv
    recall, mass_ratio, skipped, certs, overlap = [], [], [], [], []
    oracle_skipped, window_skipped = [], []
    boxes: dict = {}
    previous: dict = {}
    for t in range(steps):
        pos = start + t
        sealed = pos // block_size * block_size
        n_pages = sealed // page
        k = max(1, int(np.ceil(budget * n_pages)))
        always = always_pages(n_pages, block_size // page)
        for layer in range(DENSE_LAYERS, n_layers):
            kl = keys[layer]
            if (layer, sealed) not in boxes:
                boxes[(layer, sealed)] = page_bounds(kl[:, :sealed], page)
            lo, hi = boxes[(layer, sealed)]
            q = qs[t, layer]
            s = np.einsum("hgd,htd->hgt", q.reshape(n_kv, g, d), kl[:, : pos + 1]) / np.sqrt(d)
            s = s.reshape(n_q, -1).astype(np.float64)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            mass = p[:, :sealed].reshape(n_q, n_pages, page).sum(axis=2)  # per query head
            kv_mass = mass.reshape(n_kv, g, n_pages).mean(axis=1)
            bounds = quest_bounds(q, lo, hi)
            bkv = group_max(bounds, n_kv)
            oracle = np.argsort(-kv_mass, axis=1)[:, :k]
            chosen = np.argsort(-bkv, axis=1)[:, :k]
            for h in range(n_kv):
                recall.append(len(np.intersect1d(oracle[h], chosen[h])) / k)
                best = kv_mass[h, oracle[h]].sum()
                mass_ratio.append(kv_mass[h, chosen[h]].sum() / best if best > 0 else 1.0)
                if layer in previous:
                    overlap.append(len(np.intersect1d(previous[layer][h], chosen[h])) / k)
            previous[layer] = chosen
            # the full policy: always-attended pages, then pages by bound up to the budget
            sel = select_pages(bkv, always, k)
            sel_q = np.repeat(sel, g, axis=0)
            skipped.extend((mass * ~sel_q).sum(axis=1).tolist())
            # the references under the same budget and always-attended set
            for refs, ref_sel in (
                (oracle_skipped, oracle_pages(page_mass(s, page, sealed, n_kv), always, k)),
                (window_skipped, window_pages(n_kv, always, k)),
            ):
                refs.extend((mass * ~np.repeat(ref_sel, g, axis=0)).sum(axis=1).tolist())
            tail = np.ones((n_q, pos + 1 - sealed), bool)
            attended = np.concatenate([np.repeat(sel_q, page, axis=1), tail], axis=1)
            cert = certificate(_lse(s, attended), bounds, ~sel_q, np.full(n_pages, page))
            certs.extend(cert.tolist())
    gap = np.array(certs) - np.array(skipped)
    return {
        "page": page,
        "recall": float(np.mean(recall)),
        "mass_vs_oracle": float(np.mean(mass_ratio)),
        "skipped_mean": float(np.mean(skipped)),
        "skipped_p99": float(np.percentile(skipped, 99)),
        "oracle_skipped_mean": float(np.mean(oracle_skipped)),
        "window_skipped_mean": float(np.mean(window_skipped)),
        "cert_p50": float(np.median(certs)),
        "cert_min_minus_skipped": float(gap.min()),
        "overlap": float(np.mean(overlap)) if overlap else float("nan"),
    }


def parse_policy(spec: str, budget: float) -> SparsePolicy:
    """``"select=oracle page=16 per_query=true"`` -> a SparsePolicy (budget ``budget``
    unless given)."""
    fields = {f.name: f.type for f in dataclasses.fields(SparsePolicy)}
    kwargs: dict = {"budget": budget}
    for item in spec.split():
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--policy: unknown field {key!r} (one of {', '.join(fields)})")
        kind = fields[key]
        if kind == "bool":
            kwargs[key] = value.lower() in ("1", "true", "yes")
        elif kind == "int":
            kwargs[key] = int(value)
        elif kind == "float":
            kwargs[key] = float(value)
        else:
            kwargs[key] = value
    return SparsePolicy(**kwargs)


def describe(policy: SparsePolicy) -> str:
    """The policy's fields that differ from the default, for a table row."""
    default = SparsePolicy()
    parts = [
        f"{f.name}={getattr(policy, f.name)}"
        for f in dataclasses.fields(SparsePolicy)
        if getattr(policy, f.name) != getattr(default, f.name) and f.name != "select"
    ]
    return " ".join([policy.select, *parts])


def attended_share(log) -> float:
    """Mean share of sealed pages attended per (step, sparse layer, KV head)."""
    shares = [rec.selected.mean() for rec in log if rec.selected.shape[1]]
    return float(np.mean(shares)) if shares else 1.0


def decode_run(backend, blocks, ids, n_layers, policy: SparsePolicy | None):
    """Teacher-forced steps: (log-probs [steps, vocab], ms per token, share of pages)."""
    cache = restored(backend, blocks)
    if policy is not None:
        # the step log gives the pages attended (queries are kept too: small at 256 steps)
        cache.sparse = SparseState.new(policy, n_layers, record=True)
    out, ms = [], []
    for tok in ids:
        t0 = time.perf_counter()
        logits = backend.forward(np.array([tok]), cache)[-1]
        ms.append(1e3 * (time.perf_counter() - t0))
        out.append(logits.copy())
    share = 1.0 if cache.sparse is None else attended_share(cache.sparse.log)
    return np.array(out), np.array(ms), share


def passkey(backend, tokenizer, n_layers, policy, tokens, depths, trials, block_size):
    """Accuracy per depth, dense and sparse, of greedy retrieval of a 5-digit key."""
    rng = np.random.default_rng(0)
    rows, results = [], []
    for depth in depths:
        # the text before the key ends on a block boundary: one prefill of it serves every
        # trial at this depth
        keys = [int(k) for k in rng.integers(10000, 100000, size=trials)]
        prompts = [passkey_prompt(tokenizer.encode, tokens, depth, k, block_size) for k in keys]
        t0 = time.perf_counter()
        cache = backend.new_cache()
        backend.forward(np.asarray(prompts[0].before), cache)
        shared = cache.blocks()
        hits = {"dense": 0, "sparse": 0}
        for prompt in prompts:
            key, question = prompt.key, prompt.question
            cache = restored(backend, shared)
            backend.forward(np.asarray(prompt.needle + prompt.after), cache)
            context = cache.blocks()
            for mode in hits:
                cache = restored(backend, context)
                if mode == "sparse":
                    cache.sparse = SparseState.new(policy, n_layers)
                for tok in question[:-1]:
                    backend.forward(np.array([tok]), cache)
                tok, answer = question[-1], []
                for _ in range(7):
                    tok = int(backend.forward(np.array([tok]), cache)[-1].argmax())
                    answer.append(tok)
                found = re.search(r"\d{5}", tokenizer.decode(answer))
                hits[mode] += bool(found and int(found.group()) == key)
        length = len(prompts[0].ids)
        results.append({"depth": depth, "tokens": length, "trials": trials, **hits})
        rows.append(
            [
                f"{depth:.0%}",
                length,
                f"{hits['dense']}/{trials}",
                f"{hits['sparse']}/{trials}",
                f"{time.perf_counter() - t0:.0f}",
            ]
        )
        print(
            f"depth {depth:.0%}: dense {hits['dense']}/{trials}, sparse {hits['sparse']}/{trials}",
            flush=True,
        )
    print_table(
        f"Passkey retrieval by depth, greedy, dense vs sparse ({describe(policy)})",
        ["depth", "tokens", "dense", "sparse", "s"],
        rows,
    )
    return results


def _mappings(blocks) -> list[mmap.mmap]:
    """The file mappings the blocks' arrays are views of."""
    out: dict[int, mmap.mmap] = {}
    for block in blocks:
        keys = block.layers[0].keys
        root = buffer_root(keys if isinstance(keys, np.ndarray) else keys.packed)
        if isinstance(root, mmap.mmap):
            out[id(root)] = root
    return list(out.values())


def drop_page_cache(folder: Path, maps: list[mmap.mmap]) -> None:
    """Make the next read of the block files come from the disk: unmap their pages from
    this process, then drop them from the page cache."""
    for m in maps:
        m.madvise(mmap.MADV_DONTNEED)
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def file_pages_touched(blocks, selections: dict, page: int, os_page: int = 4096):
    """(file pages of ``os_page`` bytes under the selected pages, file pages of those
    layers' KV) over the mapped sealed ``blocks``; ``selections``: per offloaded layer, bool
    ``[n_kv, pages]`` of one step. What a read of those pages must fault in at least."""
    touched = total = 0
    for b, block in enumerate(blocks):
        if not block.sealed:
            continue
        root = buffer_root(block.layers[next(iter(selections))].keys.packed)
        if not isinstance(root, mmap.mmap):
            continue
        base = np.frombuffer(root, np.uint8).__array_interface__["data"][0]
        ppb = block.length // page
        hit: set[int] = set()
        held: set[int] = set()
        for layer, selected in selections.items():
            heads, pages = np.nonzero(selected[:, b * ppb : (b + 1) * ppb])
            kv = block.layers[layer]
            for q in (kv.keys, kv.values):
                for part in (q.packed, q.scales, q.biases):
                    off = part.__array_interface__["data"][0] - base
                    row = part.shape[2] * part.itemsize
                    held.update(range(off // os_page, (off + part.nbytes - 1) // os_page + 1))
                    first = off + (heads * part.shape[1] + pages * page) * row
                    for a, z in zip(
                        first // os_page, (first + page * row - 1) // os_page, strict=True
                    ):
                        hit.update(range(int(a), int(z) + 1))
        touched += len(hit)
        total += len(held)
    return touched, total


def kv_nbytes(blocks, layers=None) -> int:
    """Bytes of the blocks' KV (of ``layers`` only, when given)."""
    return sum(
        layer.nbytes
        for block in blocks
        for i, layer in enumerate(block.layers)
        if layers is None or i in layers
    )


def tiers_run(args, backend, model, blocks, prefix, rest) -> dict:
    """The --tiers tables (see the module's docstring)."""
    n_layers = model.config.num_layers
    bs = 256
    root = temporary_dir("edge-infer-offload-")
    bits = layer_bits(4, model.config.layer_windows())
    fmt = KVFormat(bits=4, group_size=backend.kv_group_size, block_size=bs, layer_bits=bits)
    fp = Fingerprint.of(weights="benchmark", kv_format=fmt.fingerprint_tag())
    store = AgentStore(root, fp, fmt)
    store.save("long", prefix.tolist(), blocks)
    folder = store.agent_dir("long")
    policy = SparsePolicy(budget=args.budget)
    windows = restored(backend, []).windows
    settings = OffloadSettings(HostPool(0), policy)
    offloaded_layers = settings.tiers(windows, bs).layers
    kv_total = kv_nbytes(blocks)
    # what a step reads of the layers that stay in memory: all of a global layer, the last
    # window (and the block it starts in) of a sliding-window layer
    length = len(prefix)
    kv_resident = sum(
        kv_nbytes(blocks, {i}) * (min(1.0, (w + bs) / length) if w else 1.0)
        for i, w in enumerate(windows)
        if i not in offloaded_layers
    )
    kv_offloadable = kv_nbytes(blocks, set(offloaded_layers))
    pool_bytes = int(args.pool * kv_total)

    budgets = [float(b) for b in args.budgets.split(",")]

    def tiered(pool: int, budget: float | None, prefetch: int = 0):
        snap = store.load("long", verify=False)
        cache = backend.new_cache()
        tiers = OffloadSettings(HostPool(pool), policy).tiers(cache.windows, bs)
        state = None
        if budget is not None:
            sparse = dataclasses.replace(policy, budget=budget, prefetch=prefetch)
            state = SparseState.new(sparse, n_layers)
        cache.offload(tiers, state)
        cache.append_blocks(snap.blocks)
        return cache, _mappings(snap.blocks)

    caches = {}
    caches["dense in RAM"] = (restored(backend, blocks), [])
    caches["dense streamed from disk"] = tiered(0, None)
    for budget in budgets:
        ram = restored(backend, blocks)
        ram.sparse = SparseState.new(dataclasses.replace(policy, budget=budget), n_layers)
        caches[f"sparse {budget:.0%} in RAM"] = (ram, [])
        caches[f"sparse {budget:.0%} tiered"] = tiered(pool_bytes, budget)
        if args.prefetch:
            name = f"sparse {budget:.0%} tiered, prefetch {args.prefetch}"
            caches[name] = tiered(pool_bytes, budget, args.prefetch)
    del ram
    modes = list(caches)
    logits: dict[str, list[np.ndarray]] = {m: [] for m in modes}
    ms: dict[str, list[float]] = {m: [] for m in modes}
    reads = {m: [0, 0, 0] for m in modes}  # bytes from RAM, from disk, prefetched (tiers)
    held = dict.fromkeys(modes, 0)
    for step, tok in enumerate(rest):
        for mode in modes:
            cache, maps = caches[mode]
            tiers = cache.tiers
            if maps:
                drop_page_cache(folder, maps)
            c = tiers.counters if tiers else None
            before = (c.bytes_ram, c.bytes_disk, c.bytes_prefetched) if c else (0, 0, 0)
            t0 = time.perf_counter()
            out = backend.forward(np.array([tok]), cache)[-1].copy()
            if tiers is not None:  # a step costs its prefetching too, where it is not hidden
                tiers.pool.wait_prefetch()
            elapsed = 1e3 * (time.perf_counter() - t0)
            if step == 0:  # the first step builds the page index (a one-time full read)
                if cache.sparse is not None:
                    cache.sparse.select_seconds = 0.0
                continue
            ms[mode].append(elapsed)
            logits[mode].append(out)
            if tiers is not None:
                reads[mode][0] += tiers.counters.bytes_ram - before[0]
                reads[mode][1] += tiers.counters.bytes_disk - before[1]
                reads[mode][2] += tiers.counters.bytes_prefetched - before[2]
            # in memory: a mapped block's parts (a window layer's old blocks) are on disk
            in_memory = cache.nbytes - (cache.hidden_nbytes() if maps else 0)
            held[mode] = max(held[mode], in_memory)
        if step % 16 == 0:
            print(f"step {step}: " + ", ".join(f"{m} {ms[m][-1]:.0f} ms" for m in modes if ms[m]))
    steps = len(rest) - 1
    dense = np.array(logits["dense in RAM"])
    ref = log_softmax(dense).astype(np.float64)
    rows, results = [], []
    dense_ms = float(np.median(ms["dense in RAM"]))
    for mode in modes:
        cache, _ = caches[mode]
        out = np.array(logits[mode])
        lp = log_softmax(out).astype(np.float64)
        kl = (np.exp(ref) * (ref - lp)).sum(axis=1)
        agree = float((out.argmax(axis=1) == dense.argmax(axis=1)).mean())
        sparse = cache.sparse
        n_pages = len(prefix) // policy.page
        share = sparse.policy.budget_pages(n_pages) / n_pages if sparse is not None else 1.0
        if cache.tiers is None:  # attention reads what it attends from RAM
            from_ram = kv_resident + share * kv_offloadable
            from_disk = 0.0
        else:  # what is prefetched comes from the disk too
            from_ram = kv_resident + reads[mode][0] / steps
            from_disk = (reads[mode][1] + reads[mode][2]) / steps
        hit = f"{cache.tiers.counters.hit_rate:.0%}" if sparse and cache.tiers else "-"
        select = 1e3 * sparse.select_seconds / steps if sparse is not None else 0.0
        r = {
            "mode": mode,
            "ms_median": float(np.median(ms[mode])),
            "ms_p90": float(np.percentile(ms[mode], 90)),
            "kv_ram_per_token": from_ram,
            "kv_disk_per_token": from_disk,
            "kv_held": held[mode],
            "hit_rate": cache.tiers.counters.hit_rate if cache.tiers is not None else None,
            "select_ms": select,
            "top1": agree,
            "kl_mean": float(kl.mean()),
        }
        results.append(r)
        rows.append(
            [
                mode,
                f"{r['ms_median']:.0f} ({dense_ms / r['ms_median']:.2f}x)",
                f"{r['ms_p90']:.0f}",
                f"{from_ram / 2**20:.2f}",
                f"{from_disk / 2**20:.2f}",
                f"{held[mode] / 2**20:.1f}",
                hit,
                f"{select:.1f}",
                f"{100 * agree:.1f}%",
                f"{kl.mean():.4f}",
            ]
        )
    print_table(
        f"Where the KV lives: {len(prefix)} tokens, {steps} teacher-forced steps, modes "
        f"interleaved; sparse = that share of pages by Quest bound (first "
        f"{policy.dense_layers} layers dense); pool {args.pool:.0%} of the KV "
        f"({pool_bytes / 2**20:.1f} MiB of {kv_total / 2**20:.1f} MiB)",
        [
            "mode",
            "ms/tok p50 (vs dense RAM)",
            "p90",
            "KV MiB/tok from RAM",
            "from disk",
            "KV held MiB",
            "hit rate",
            "select ms/tok",
            "top-1 vs dense",
            "KL mean",
        ],
        rows,
    )
    tiered_cache = caches[f"sparse {budgets[0]:.0%} tiered"][0]
    index = tiered_cache.sparse.index.snapshot()
    files = [e for e in store.load("long").files][: index.covered() // bs]
    index.truncate(len(files) * bs)
    index.save(store.page_index_path("long"), files)
    del caches

    # time to first token of the agent on disk
    tok = int(rest[0])

    def offloaded_resume(record: bool = False):
        """The agent mapped from disk, offloaded, with its page index: (cache, snapshot)."""
        snap = store.load("long", verify=False)
        cache = backend.new_cache()
        state = SparseState.new(policy, n_layers, record=record)
        index = PageIndex.load(store.page_index_path("long"), snap.files, n_layers, policy.page, bs)
        assert index is not None, "the page index was not saved"
        state.index = index
        cache.offload(settings_for(pool_bytes, policy).tiers(cache.windows, bs), state)
        cache.append_blocks(snap.blocks)
        return cache, snap

    resume: dict[str, list[float]] = {"full restore": [], "offloaded resume": []}
    for _ in range(args.resume_runs):
        for mode in resume:
            snap = store.load("long", verify=False)
            drop_page_cache(folder, _mappings(snap.blocks))
            del snap
            t0 = time.perf_counter()
            if mode == "full restore":
                snap = store.load("long")
                cache = backend.new_cache()
                cache.append_blocks(snap.blocks)
            else:
                cache, snap = offloaded_resume()
            backend.forward(np.array([tok]), cache)
            resume[mode].append(1e3 * (time.perf_counter() - t0))
            del cache, snap
    full = float(np.median(resume["full restore"]))
    rows = [[m, f"{np.median(v):.0f}", f"{full / np.median(v):.2f}x"] for m, v in resume.items()]
    print_table(
        f"Time to first token of the {len(prefix)}-token agent on disk (page cache dropped; "
        f"median of {args.resume_runs}, interleaved)",
        ["mode", "ms", "vs full restore"],
        rows,
    )
    # how much of the files the first step's pages lie on: a resume reads at least that
    cache, snap = offloaded_resume(record=True)
    backend.forward(np.array([tok]), cache)
    assert cache.sparse is not None
    chosen = {
        r.layer: r.selected
        for r in cache.sparse.log
        if r.selected.shape[1] and cache.is_offloaded(r.layer)
    }
    touched, total = file_pages_touched(snap.blocks, chosen, policy.page)
    attended = np.mean([s.mean() for s in chosen.values()])
    print(
        f"The first step attends {attended:.0%} of the offloaded layers' pages ({policy.page} "
        f"tokens); they lie on {touched / total:.0%} of those layers' 4 KiB file pages "
        f"({touched} of {total}): what an offloaded resume must read at least."
    )
    del cache, snap
    return {
        "modes": results,
        "resume_ms": {m: [float(x) for x in v] for m, v in resume.items()},
        "resume_file_pages": {"touched": touched, "total": total, "attended": float(attended)},
        "budgets": budgets,
        "pool": args.pool,
    }


def settings_for(pool_bytes: int, policy: SparsePolicy) -> OffloadSettings:
    return OffloadSettings(HostPool(pool_bytes), policy)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--record", type=int, default=32)
    ap.add_argument("--pages", default="256,64,32")
    ap.add_argument("--budget", type=float, default=0.25, help="share of pages")
    ap.add_argument(
        "--policy",
        action="append",
        help="SparsePolicy fields as key=value (repeatable); default: bound, oracle and "
        "window at --budget, and the default policy",
    )
    ap.add_argument("--tiers", action="store_true", help="where the KV lives: RAM, disk")
    ap.add_argument("--pool", type=float, default=0.25, help="pool share of the KV (--tiers)")
    ap.add_argument("--budgets", default="0.25,0.5", help="shares of pages (--tiers)")
    ap.add_argument("--resume-runs", type=int, default=3)
    ap.add_argument(
        "--prefetch",
        type=int,
        default=8,
        help="pages per KV head prefetched (--tiers; 0: no row)",
    )
    ap.add_argument("--model", default=None, help="a catalog name or file (default model)")
    ap.add_argument("--passkey", action="store_true", help="passkey retrieval by depth")
    ap.add_argument("--trials", type=int, default=10, help="passkey trials per depth")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    pages = [int(p) for p in args.pages.split(",")]
    budgets = [args.budget]
    model = load_model(args.model or default_model_path())
    n_layers = model.config.num_layers
    backend = TorchBackend(model, device="cpu", kv_bits=4)
    if args.passkey:
        policy = parse_policy(args.policy[0], args.budget) if args.policy else SparsePolicy()
        depths = [float(d) for d in args.depths.split(",")]
        results = passkey(
            backend, model.tokenizer, n_layers, policy, args.tokens, depths, args.trials, 256
        )
        print(f"\n{machine()}")
        write_results(args.json, {"passkey": results, "policy": describe(policy)})
        return
    specs = args.policy or ["select=bound", "select=oracle", "select=window"]
    policies = [parse_policy(spec, args.budget) for spec in specs]
    if not args.policy:
        policies.append(SparsePolicy())
    ids = corpus_ids(model.tokenizer, args.tokens)
    prefix, rest = ids[: args.tokens - args.steps], ids[args.tokens - args.steps :]
    t0 = time.perf_counter()
    cache = backend.new_cache()
    backend.forward(prefix, cache)
    blocks = cache.blocks()
    del cache
    print(f"prefill {len(prefix)} tokens: {time.perf_counter() - t0:.0f} s", flush=True)
    results: dict = {"tokens": args.tokens, "budgets": budgets}
    if args.tiers:
        results["tiers"] = tiers_run(args, backend, model, blocks, prefix, rest)
        print(f"\n{machine()}")
        write_results(args.json, results)
        return

    t0 = time.perf_counter()
    start, qs, keys = record_queries(backend, blocks, rest[: args.record], n_layers)
    rows = []
    results["recall"] = []
    for page in pages:
        r = page_recall(start, qs, keys, page, budgets[0], 256)
        results["recall"].append(r)
        rows.append(
            [
                page,
                f"{100 * r['recall']:.1f}%",
                f"{100 * r['mass_vs_oracle']:.1f}%",
                f"{100 * r['skipped_mean']:.2f}% / {100 * r['skipped_p99']:.2f}%",
                f"{100 * r['oracle_skipped_mean']:.2f}%",
                f"{100 * r['window_skipped_mean']:.2f}%",
                f"{r['cert_p50']:.3f}",
                "yes" if r["cert_min_minus_skipped"] >= -1e-9 else "NO",
                f"{100 * r['overlap']:.1f}%",
            ]
        )
    print_table(
        f"Page selection at {args.tokens} tokens, budget {budgets[0]:.0%}, layers >= "
        f"{DENSE_LAYERS}, {args.record} steps x {n_layers - DENSE_LAYERS} layers x KV heads "
        f"({time.perf_counter() - t0:.0f} s)",
        [
            "page",
            "oracle recall",
            "mass vs oracle",
            "policy skips (mean/p99)",
            "oracle skips",
            "window skips",
            "certificate p50",
            "cert >= skipped",
            "step overlap",
        ],
        rows,
    )
    print(flush=True)

    dense, dense_ms, _ = decode_run(backend, blocks, rest, n_layers, None)
    ref = log_softmax(dense).astype(np.float64)
    rows = [
        [
            "dense",
            "100%",
            "-",
            "-",
            "-",
            f"{np.median(dense_ms):.0f}",
            f"{np.percentile(dense_ms, 90):.0f}",
        ]
    ]
    results["quality"] = []
    print(f"dense: {np.median(dense_ms):.0f} ms/token", flush=True)
    for policy in policies:
        out, ms, share = decode_run(backend, blocks, rest, n_layers, policy)
        lp = log_softmax(out).astype(np.float64)
        kl = (np.exp(ref) * (ref - lp)).sum(axis=1)
        agree = float((out.argmax(axis=1) == dense.argmax(axis=1)).mean())
        name = describe(policy)
        results["quality"].append(
            {
                "policy": name,
                "pages_attended": share,
                "top1": agree,
                "kl_mean": float(kl.mean()),
                "kl_p99": float(np.percentile(kl, 99)),
                "ms_median": float(np.median(ms)),
                "ms_p90": float(np.percentile(ms, 90)),
            }
        )
        print(f"{name}: pages {share:.1%}, top-1 {agree:.3f}, KL {kl.mean():.4f}", flush=True)
        rows.append(
            [
                name,
                f"{100 * share:.1f}%",
                f"{100 * agree:.1f}%",
                f"{kl.mean():.4f}",
                f"{np.percentile(kl, 99):.4f}",
                f"{np.median(ms):.0f}",
                f"{np.percentile(ms, 90):.0f}",
            ]
        )
    full, _, _ = decode_run(
        backend, blocks, rest, n_layers, SparsePolicy(page=pages[-1], budget=1.0)
    )
    results["all_pages_bit_identical"] = bool(np.array_equal(full, dense))
    print_table(
        f"Teacher-forced decode, {args.steps} steps after {len(prefix)} tokens "
        f"(all-pages budget bit-identical to dense: "
        f"{results['all_pages_bit_identical']})",
        [
            "mode",
            "pages attended",
            "top-1 vs dense",
            "KL mean",
            "KL p99",
            "ms/tok p50",
            "ms/tok p90",
        ],
        rows,
    )
    print(f"\n{machine()}")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
