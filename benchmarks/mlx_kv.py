"""MLX KV caches side by side: ours (the stored 4/8-bit blocks) vs mlx-lm's own caches.

    python -m benchmarks.mlx_kv [--context 4096] [--decode-at 2048] [--agree 512] [--float]

Each cache runs the default model through the first ``--context`` tokens of the Python docs,
on the same MLX weights (the backend's mlx-lm model: mlx-lm's caches run through its own
model call, ours through the backend). One pass per cache measures:

- agreement: the first ``--agree`` positions, teacher-forced in chunks of 512, against the
  float64 reference (``tests/support/reference_llama.py``, needs the ``gguf`` package of the
  dev extra): top-1 agreement and mean KL(reference || cache);
- decode speed at ``--decode-at`` tokens of context: ``--decode-tokens`` one-token steps
  (the next corpus tokens), each timed to its logits in numpy, the caches taking turns step
  by step; the median step;
- memory at ``--context`` tokens: bytes per token of the arrays the cache holds, and what
  ``mx.get_active_memory()`` falls by when the cache is dropped.

Rows: ours with ``kv_bits=4`` and ``8``, mlx-lm's ``QuantizedKVCache`` (4-bit, group 64),
and with ``--float`` ours with float16 KV and mlx-lm's plain ``KVCache``. Targets for ours at
4-bit: at most 7.5 KB/token (KB = 1000 bytes), no bigger and no slower than mlx-lm's 4-bit
cache, and closer to the reference.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from benchmarks.common import machine, print_table, write_results
from benchmarks.kv_quality import corpus_ids
from edge_infer.backends.mlx.backend import MLXBackend
from edge_infer.generation.sampling import log_softmax
from edge_infer.models.default_model import default_model_path
from edge_infer.models.loader import load_model
from tests.support.reference_llama import ReferenceLlama, log_softmax64

CHUNK = 512
KV4_TARGET_BYTES = 7500  # per token at 4K context


class Ours:
    """Our stored-format cache, through the backend's forward."""

    def __init__(self, backend: MLXBackend) -> None:
        self.backend, self.cache = backend, backend.new_cache()

    def feed(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        return self.backend.forward(ids, self.cache, all_logits=all_logits)

    def nbytes(self) -> int:
        return self.cache.nbytes


class MlxLm:
    """mlx-lm's own caches, through mlx-lm's model call on the same weights."""

    def __init__(self, backend: MLXBackend, make: Callable[[], object]) -> None:
        self.model = backend.mlx_model
        self.tied = backend.config.tie_word_embeddings
        self.caches = [make() for _ in range(backend.config.num_layers)]

    def feed(self, ids: np.ndarray, all_logits: bool) -> np.ndarray:
        h = self.model.model(mx.array(ids.astype(np.int32))[None], cache=self.caches)
        if not all_logits:
            h = h[:, -1:]
        if self.tied:
            logits = self.model.model.embed_tokens.as_linear(h)
        else:
            logits = self.model.lm_head(h)
        logits = logits[0].astype(mx.float32)
        mx.eval(logits, [c.state for c in self.caches])
        return np.array(logits)

    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)


def measure(rows: list[tuple[str, Callable[[], Ours | MlxLm]]], ids, ref, args) -> list[dict]:
    """Agreement and prefill to ``--decode-at`` cache by cache; decode steps interleaved
    across the caches (so a busy machine slows them alike); then each cache filled to
    ``--context`` and its memory read, last by dropping it."""
    runners, out = {}, {}
    for name, make in rows:
        runner = runners[name] = make()
        lps = [
            log_softmax(runner.feed(ids[s : min(s + CHUNK, args.agree)], True))
            for s in range(0, args.agree, CHUNK)
        ]
        lp = np.concatenate(lps).astype(np.float64)
        for s in range(args.agree, args.decode_at, CHUNK):
            runner.feed(ids[s : min(s + CHUNK, args.decode_at)], False)
        out[name] = {
            "cache": name,
            "top1_vs_reference": float(np.mean(ref.argmax(-1) == lp.argmax(-1))),
            "mean_kl_vs_reference": float(np.mean(np.sum(np.exp(ref) * (ref - lp), axis=-1))),
        }
        print(f"  {name}: agreement and prefill to {args.decode_at} done", flush=True)
    steps: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(args.decode_at, args.decode_at + args.decode_tokens):
        for name, runner in runners.items():
            t = time.perf_counter()
            runner.feed(ids[i : i + 1], False)
            steps[name].append(time.perf_counter() - t)
    for name in list(runners):
        runner = runners[name]
        for s in range(args.decode_at + args.decode_tokens, args.context, CHUNK):
            runner.feed(ids[s : min(s + CHUNK, args.context)], False)
        held = runner.nbytes()
        gc.collect()
        before = mx.get_active_memory()
        del runner, runners[name]
        gc.collect()
        freed = before - mx.get_active_memory()
        out[name].update(
            bytes_per_token_arrays=held / args.context,
            bytes_per_token_active=freed / args.context,
            decode_tok_s=1.0 / statistics.median(steps[name]),
        )
    return [out[name] for name, _ in rows]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--context", type=int, default=4096, help="tokens held when memory is read")
    ap.add_argument("--decode-at", type=int, default=2048, help="context of the decode steps")
    ap.add_argument("--decode-tokens", type=int, default=16, help="decode steps timed")
    ap.add_argument("--agree", type=int, default=512, help="positions compared to the reference")
    ap.add_argument("--float", action="store_true", help="also the float caches")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not 0 < args.agree <= args.decode_at < args.decode_at + args.decode_tokens <= args.context:
        ap.error("need 0 < --agree <= --decode-at < --decode-at + --decode-tokens <= --context")

    model = load_model(None)
    ids = np.asarray(corpus_ids(model, args.context), dtype=np.int64)
    print(f"float64 reference over {args.agree} tokens ...", flush=True)
    ref = log_softmax64(ReferenceLlama(default_model_path()).forward(list(ids[: args.agree])))
    backends = {bits: MLXBackend(model, kv_bits=bits) for bits in (4, 8, 16)}
    rows = [
        ("ours, kv_bits=4", lambda: Ours(backends[4])),
        ("ours, kv_bits=8", lambda: Ours(backends[8])),
        (
            "mlx-lm QuantizedKVCache(bits=4, group_size=64)",
            lambda: MlxLm(backends[4], lambda: QuantizedKVCache(group_size=64, bits=4)),
        ),
    ]
    if args.float:
        rows += [
            ("ours, kv_bits=16 (float16)", lambda: Ours(backends[16])),
            ("mlx-lm KVCache (activation dtype)", lambda: MlxLm(backends[16], KVCache)),
        ]
    device = backends[4].device
    print(f"{len(rows)} caches, {args.context} tokens each on MLX ({device}) ...", flush=True)
    results = measure(rows, ids, ref, args)

    print_table(
        f"MLX KV caches: {model.name} ({model.quantization}) on MLX/{device}, Python docs; "
        f"memory at {args.context} tokens, decode at {args.decode_at}, agreement with the "
        f"float64 reference over {args.agree} tokens - {machine()}",
        [
            "cache",
            "KB/token (arrays)",
            "KB/token (active mem)",
            f"decode tok/s @{args.decode_at}",
            "top-1 vs ref",
            "mean KL vs ref",
        ],
        [
            [
                r["cache"],
                f"{r['bytes_per_token_arrays'] / 1000:.2f}",
                f"{r['bytes_per_token_active'] / 1000:.2f}",
                f"{r['decode_tok_s']:.2f}",
                f"{100 * r['top1_vs_reference']:.2f}%",
                f"{r['mean_kl_vs_reference']:.5f}",
            ]
            for r in results
        ],
    )
    ours, q8, theirs = results[0], results[1], results[2]
    checks = [
        (
            f"ours 4-bit <= {KV4_TARGET_BYTES / 1000} KB/token",
            ours["bytes_per_token_arrays"] <= KV4_TARGET_BYTES
            and ours["bytes_per_token_active"] <= KV4_TARGET_BYTES,
        ),
        (
            "ours 8-bit about 2x 4-bit "
            f"({q8['bytes_per_token_arrays'] / ours['bytes_per_token_arrays']:.2f}x)",
            1.5 <= q8["bytes_per_token_arrays"] / ours["bytes_per_token_arrays"] <= 2.2,
        ),
        (
            "no bigger than mlx-lm 4-bit",
            ours["bytes_per_token_arrays"] <= theirs["bytes_per_token_arrays"],
        ),
        (
            f"no slower than mlx-lm 4-bit ({ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}x)",
            ours["decode_tok_s"] >= theirs["decode_tok_s"],
        ),
        (
            "closer to the reference",
            ours["mean_kl_vs_reference"] < theirs["mean_kl_vs_reference"],
        ),
    ]
    print("targets: " + "; ".join(f"{text}: {'MET' if ok else 'NOT MET'}" for text, ok in checks))
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    write_results(args.json, {"model": model.name, "device": device, **settings, "rows": results})


if __name__ == "__main__":
    main()
