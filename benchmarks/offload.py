"""Sparse decode over page selections: how well Quest bounds find the pages that matter, and
what attending only them costs in quality, on the default model over real English text.

    python -m benchmarks.offload [--tokens 8192] [--steps 256] [--pages 256,64,32]
                                 [--budget 0.25] [--record 32] [--policy "select=oracle" ...]
                                 [--json PATH]
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

``--passkey``: a 5-digit key hidden at each ``--depths`` share of ``--tokens`` tokens of
filler; after a dense prefill of the context, the question is fed and the answer greedily
decoded token by token, dense and sparse (the first ``--policy``, else the default) from the
same prefilled cache: retrieval accuracy per depth.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    corpus_text,
    machine,
    passkey_prompt,
    print_table,
    write_results,
)
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
    oracle_pages,
    page_bounds,
    page_mass,
    quest_bounds,
    select_pages,
    window_pages,
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
    ap.add_argument("--passkey", action="store_true", help="passkey retrieval by depth")
    ap.add_argument("--trials", type=int, default=10, help="passkey trials per depth")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    pages = [int(p) for p in args.pages.split(",")]
    budgets = [args.budget]
    model = load_model(default_model_path())
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
