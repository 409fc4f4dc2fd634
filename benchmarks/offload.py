"""Sparse decode over page selections: how well Quest bounds find the pages that matter, and
what attending only them costs in quality, on the default model over real English text.

    python -m benchmarks.offload [--tokens 8192] [--steps 256] [--pages 256,64,32]
                                 [--budget 0.25[,0.5...]] [--record 32] [--json PATH]

One prefill of ``--tokens - --steps`` tokens of the Python docs (4-bit KV, torch CPU); every
run after it starts from a copy of that cache (restored from its blocks).

1. Page recall. ``--record`` teacher-forced decode steps record the real queries of every
   layer. For each page size, per (step, layer >= 2, KV head): the pages of the top
   ``budget`` share by true attention mass (the oracle) against the top pages by Quest bound:
   recall of the oracle's pages, attention mass the bound's pages hold vs the oracle's, the
   mass the full policy (first and last sealed block always, then pages by bound) skips and
   its certificate, and the overlap of the bound's selection from one step to the next.
2. Quality. ``--steps`` teacher-forced steps, dense and sparse (each page size) on the same
   tokens: top-1 agreement and KL(dense || sparse) of the next-token distributions, ms per
   token (median, p90; runs one after the other on a shared machine: read ratios only), and
   whether an all-pages budget gives the dense logits bit for bit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.common import corpus_text, machine, print_table, write_results
from edge_infer.backends.torch.backend import TorchBackend
from edge_infer.generation.sampling import log_softmax
from edge_infer.models.default_model import default_model_path
from edge_infer.models.loader import load_model
from edge_infer.offload import (
    SparsePolicy,
    SparseState,
    always_pages,
    certificate,
    group_max,
    page_bounds,
    quest_bounds,
    select_pages,
)

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
        "cert_p50": float(np.median(certs)),
        "cert_min_minus_skipped": float(gap.min()),
        "overlap": float(np.mean(overlap)) if overlap else float("nan"),
    }


def decode_run(backend, blocks, ids, n_layers, policy: SparsePolicy | None):
    """Teacher-forced steps: (log-probs [steps, vocab], ms per token)."""
    cache = restored(backend, blocks)
    if policy is not None:
        cache.sparse = SparseState.new(policy, n_layers)
    out, ms = [], []
    for tok in ids:
        t0 = time.perf_counter()
        logits = backend.forward(np.array([tok]), cache)[-1]
        ms.append(1e3 * (time.perf_counter() - t0))
        out.append(logits.copy())
    return np.array(out), np.array(ms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--record", type=int, default=32)
    ap.add_argument("--pages", default="256,64,32")
    ap.add_argument("--budget", default="0.25", help="share of pages; a list runs each")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    pages = [int(p) for p in args.pages.split(",")]
    budgets = [float(b) for b in args.budget.split(",")]
    model = load_model(default_model_path())
    n_layers = model.config.num_layers
    backend = TorchBackend(model, device="cpu", kv_bits=4)
    ids = corpus_ids(model.tokenizer, args.tokens)
    prefix, rest = ids[: args.tokens - args.steps], ids[args.tokens - args.steps :]
    t0 = time.perf_counter()
    cache = backend.new_cache()
    backend.forward(prefix, cache)
    blocks = cache.blocks()
    del cache
    print(f"prefill {len(prefix)} tokens: {time.perf_counter() - t0:.0f} s", flush=True)
    results: dict = {"tokens": args.tokens, "budgets": budgets}

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
            "certificate p50",
            "cert >= skipped",
            "step overlap",
        ],
        rows,
    )
    print(flush=True)

    dense, dense_ms = decode_run(backend, blocks, rest, n_layers, None)
    ref = log_softmax(dense).astype(np.float64)
    rows = [
        ["dense", "-", "-", "-", f"{np.median(dense_ms):.0f}", f"{np.percentile(dense_ms, 90):.0f}"]
    ]
    results["quality"] = []
    print(f"dense: {np.median(dense_ms):.0f} ms/token", flush=True)
    for page, budget in ((p, b) for b in budgets for p in pages):
        policy = SparsePolicy(page=page, budget=budget, dense_layers=DENSE_LAYERS)
        out, ms = decode_run(backend, blocks, rest, n_layers, policy)
        lp = log_softmax(out).astype(np.float64)
        kl = (np.exp(ref) * (ref - lp)).sum(axis=1)
        agree = float((out.argmax(axis=1) == dense.argmax(axis=1)).mean())
        results["quality"].append(
            {
                "page": page,
                "top1": agree,
                "kl_mean": float(kl.mean()),
                "kl_p99": float(np.percentile(kl, 99)),
                "ms_median": float(np.median(ms)),
                "ms_p90": float(np.percentile(ms, 90)),
            }
        )
        print(f"sparse P={page} {budget:.0%}: top-1 {agree:.3f}, KL {kl.mean():.4f}", flush=True)
        rows.append(
            [
                f"sparse P={page} {budget:.0%}",
                f"{100 * agree:.1f}%",
                f"{kl.mean():.4f}",
                f"{np.percentile(kl, 99):.4f}",
                f"{np.median(ms):.0f}",
                f"{np.percentile(ms, 90):.0f}",
            ]
        )
    full, _ = decode_run(backend, blocks, rest, n_layers, SparsePolicy(page=pages[-1], budget=1.0))
    results["all_pages_bit_identical"] = bool(np.array_equal(full, dense))
    print_table(
        f"Teacher-forced decode, {args.steps} steps after {len(prefix)} tokens "
        f"(all-pages budget bit-identical to dense: "
        f"{results['all_pages_bit_identical']})",
        ["mode", "top-1 vs dense", "KL mean", "KL p99", "ms/tok p50", "ms/tok p90"],
        rows,
    )
    print(f"\n{machine()}; shared, busy machine: timings are indicative only")
    write_results(args.json, results)


if __name__ == "__main__":
    main()
