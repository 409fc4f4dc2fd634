"""What KV-cache quantization costs in quality, on the default model over real English text.

    python -m benchmarks.kv_quality [--tokens 4096] [--backends torch,mlx] [--model NAME]
        [--json PATH]

The first ``--tokens`` tokens of the Python docs go through the model once per backend and KV
format (float16 = the baseline, 8-bit, 4-bit), with the same chunked prefill and quantized KV
cache path that generation uses (:meth:`Engine.logits`). For each backend and format it
reports:

- perplexity of the actual next token over positions 1..N-1 (exp of the mean NLL), and its
  relative change vs float16;
- mean KL(float16 || format) of the next-token distributions, in nats;
- top-1 agreement: how often the format's most likely next token is float16's.

With two backends it also compares them at each KV format: mean KL(torch || mlx) and top-1
agreement, since both read the same stored format and should compute the same thing.

Targets: 4-bit KV perplexity within +1.5% of float16, 8-bit within +0.5%.

Memory: all backends and formats run in lockstep, one prefill chunk of positions at a time,
so only a chunk's log-probs per run are alive at once (N x vocab float32 would be ~800 MB per
run at N = 4096), and the metrics are accumulated as sums.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import corpus_text, machine, print_table
from edge_infer.backends.select import create_backend
from edge_infer.cache_store.kv_format import layer_bits
from edge_infer.engine import Engine
from edge_infer.errors import BackendUnavailableError
from edge_infer.generation.sampling import log_softmax
from edge_infer.models.loader import load_model
from edge_infer.models.spec import LoadedModel

KV_FORMATS = (16, 8, 4)  # 16 = float16, the baseline; it must come first
TARGETS = {4: 1.5, 8: 0.5}  # max perplexity increase vs float16, in percent
FORMAT_NAMES = {16: "float16", 8: "8-bit", 4: "4-bit"}
METRIC_ROWS = 64  # positions per block when computing KL in float64


def corpus_ids(model: LoadedModel, n: int) -> list[int]:
    """The first ``n`` tokens of the corpus (tokenizing only as much text as needed)."""
    text = corpus_text()
    chars = 8 * n
    while True:
        ids = model.tokenizer.encode(text[:chars])
        if len(ids) > n or chars >= len(text):
            return ids[:n]
        chars *= 2


def iter_logprobs(eng: Engine, ids: Sequence[int]) -> Iterator[np.ndarray]:
    """:meth:`Engine.logits` of ``ids``, one prefill chunk of positions at a time.

    The same calls as ``Engine.logits`` (a fresh cache, ``forward`` per ``prefill_chunk``
    tokens with all logits, ``log_softmax``), without concatenating the whole [N, vocab].
    """
    arr = np.asarray(ids, dtype=np.int64)
    cache = eng.runner.new_cache()
    for start in range(0, len(arr), eng.prefill_chunk):
        out = eng.backend.forward(arr[start : start + eng.prefill_chunk], cache, all_logits=True)
        yield log_softmax(out)


class Accumulator:
    """Running sums of one run's metrics against a baseline run (its float16 KV, or the
    other backend)."""

    def __init__(self) -> None:
        self.n = 0
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.seconds = 0.0

    def add(self, lp: np.ndarray, lp16: np.ndarray, targets: np.ndarray) -> None:
        """Rows of log-probs ``lp`` / the baseline's ``lp16`` [k, vocab] whose actual next
        tokens are ``targets`` [k]."""
        self.n += len(targets)
        self.nll -= float(lp[np.arange(len(targets)), targets].astype(np.float64).sum())
        self.agree += int((lp.argmax(axis=-1) == lp16.argmax(axis=-1)).sum())
        for s in range(0, len(targets), METRIC_ROWS):  # float64 temporaries stay small
            a16 = lp16[s : s + METRIC_ROWS].astype(np.float64)
            a = lp[s : s + METRIC_ROWS].astype(np.float64)
            self.kl += float((np.exp(a16) * (a16 - a)).sum())

    def result(self) -> dict:
        mean_nll = self.nll / self.n
        return {
            "positions": self.n,
            "mean_nll": mean_nll,
            "perplexity": math.exp(mean_nll),
            "mean_kl_vs_fp16": self.kl / self.n,
            "top1_agreement": self.agree / self.n,
            "seconds": self.seconds,
        }


def measure(backends: Sequence[str], model: LoadedModel, ids: list[int]) -> list[dict]:
    """Metrics of every KV format on each of ``backends`` over ``ids``, all in lockstep, and
    (with two backends) of the second against the first at each format."""
    runs: dict[tuple[str, int], Engine] = {}
    available = []
    for name in backends:
        try:
            for b in KV_FORMATS:
                runs[name, b] = Engine(model, create_backend(model, name, kv_bits=b))
        except BackendUnavailableError as e:
            print(f"skipping {name}: {e}")
            continue
        available.append(name)
    backends = available
    streams = {key: iter_logprobs(eng, ids) for key, eng in runs.items()}
    accs = {key: Accumulator() for key in runs}
    pairs = {b: Accumulator() for b in KV_FORMATS} if len(backends) == 2 else {}
    n_eval = len(ids) - 1  # row i predicts token i + 1: rows 0..N-2 have a target
    pos = 0
    while pos < n_eval:
        chunk = {}
        for key in runs:
            t0 = time.perf_counter()
            chunk[key] = next(streams[key])
            accs[key].seconds += time.perf_counter() - t0
        k = min(len(next(iter(chunk.values()))), n_eval - pos)
        targets = np.asarray(ids[pos + 1 : pos + 1 + k], dtype=np.int64)
        for name, b in runs:
            accs[name, b].add(chunk[name, b][:k], chunk[name, 16][:k], targets)
        for b, acc in pairs.items():
            acc.add(chunk[backends[1], b][:k], chunk[backends[0], b][:k], targets)
        pos += k
        del chunk
    out = []
    for name in backends:
        results = {b: accs[name, b].result() for b in KV_FORMATS}
        ppl16 = results[16]["perplexity"]
        for r in results.values():
            r["ppl_change_pct"] = 100.0 * (r["perplexity"] / ppl16 - 1.0)
        device = runs[name, 16].backend.device
        out.append({"backend": name, "device": device, "formats": results})
    if pairs:
        versus = {b: acc.result() for b, acc in pairs.items()}
        out.append({"backend": f"{backends[1]} vs {backends[0]}", "formats": versus})
    return out


def format_name(model: LoadedModel, bits: int) -> str:
    """``bits``'s name, and the layers stored in other bits (see ``layer_bits``)."""
    per_layer = layer_bits(bits, model.config.layer_windows())
    others = sorted({b for b in per_layer if b != bits})
    return FORMAT_NAMES[bits] + "".join(f" ({per_layer.count(b)} layers {b}-bit)" for b in others)


def target_checks(res: dict) -> dict:
    """{kv_bits: (limit %, measured %, met)} for the formats that have a target."""
    out = {}
    for bits, limit in TARGETS.items():
        change = res["formats"][bits]["ppl_change_pct"]
        out[bits] = (limit, change, change <= limit)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tokens", type=int, default=4096, help="corpus tokens to score")
    ap.add_argument("--backends", default="torch,mlx", help="comma-separated: torch, mlx")
    ap.add_argument("--model", help="a catalog name or model path (default: the default model)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    model = load_model(args.model)
    ctx = model.config.context_length
    if not 2 <= args.tokens <= ctx:
        ap.error(f"--tokens must be between 2 and the model's context ({ctx})")
    ids = corpus_ids(model, args.tokens)
    if len(ids) < args.tokens:
        print(f"note: the corpus has only {len(ids)} tokens")

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    kvs = ", ".join(map(str, KV_FORMATS))
    print(f"scoring {len(ids)} tokens on {', '.join(backends)} (KV {kvs}) ...", flush=True)
    results = measure(backends, model, ids)
    per_backend = [res for res in results if "device" in res]
    versus = [res for res in results if "device" not in res]

    rows = []
    for res in per_backend:
        for bits in KV_FORMATS:
            r = res["formats"][bits]
            rows.append(
                [
                    f"{res['backend']} ({res['device']})",
                    format_name(model, bits),
                    f"{r['perplexity']:.4f}",
                    "-" if bits == 16 else f"{r['ppl_change_pct']:+.3f}%",
                    "-" if bits == 16 else f"{r['mean_kl_vs_fp16']:.5f}",
                    "-" if bits == 16 else f"{100 * r['top1_agreement']:.2f}%",
                    f"{r['seconds']:.1f}",
                ]
            )
    print_table(
        f"KV-cache quality: {model.name} ({model.quantization}), {len(ids)} tokens of Python "
        f"docs, perplexity over positions 1..{len(ids) - 1} - {machine()}",
        [
            "backend",
            "KV",
            "perplexity",
            "ppl vs fp16",
            "mean KL(fp16||KV) nats",
            "top-1 agree",
            "seconds",
        ],
        rows,
    )
    for res in versus:
        print_table(
            f"Backends side by side: {res['backend']} at the same KV format (mean KL and top-1 "
            "agreement of the next-token distributions; perplexity change of the first)",
            ["KV", "mean KL nats", "top-1 agree"],
            [
                [
                    FORMAT_NAMES[bits],
                    f"{r['mean_kl_vs_fp16']:.5f}",
                    f"{100 * r['top1_agreement']:.2f}%",
                ]
                for bits, r in res["formats"].items()
            ],
        )
    for res in per_backend:
        parts = []
        for bits, (limit, change, met) in target_checks(res).items():
            parts.append(
                f"{FORMAT_NAMES[bits]} KV ppl within +{limit}% of FP16: "
                f"{'MET' if met else 'NOT MET'} ({change:+.3f}%)"
            )
        print(f"targets [{res['backend']}]: " + "; ".join(parts))

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "machine": machine(),
            "model": model.name,
            "quantization": model.quantization,
            "tokens": len(ids),
            "targets_pct": TARGETS,
            "results": [
                {
                    **res,
                    "targets": {
                        str(bits): {"limit_pct": lim, "change_pct": ch, "met": met}
                        for bits, (lim, ch, met) in target_checks(res).items()
                    },
                }
                for res in per_backend
            ],
            "versus": versus,
        }
        args.json.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
