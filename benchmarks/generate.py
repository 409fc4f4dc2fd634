"""Prefill and decode speed of each backend on the default model, next to llama.cpp.

    python benchmarks/generate.py [--prompt-tokens 512] [--decode-tokens 128] [--runs 3]

Each engine gets the same token ids (a 512-token slice of the Python docs), greedy decoding
with end-of-sequence ignored, on the same GGUF file. llama-cpp-python is used when installed
(``pip install 'edge-infer[bench]'``). The engines take turns, one run each per round, so
that a slow spell of a shared machine hits all of them. Throughputs are medians (and bests)
over the runs; ratios compare medians measured in this one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.common import corpus_text, machine, print_table, summarize, write_results
from edge_infer.backends.select import create_backend
from edge_infer.engine import Engine
from edge_infer.models.loader import load_model


class EdgeRunner:
    """One edge-infer backend: each :meth:`run` prefills the prompt and decodes."""

    def __init__(self, backend: str, model, ids: list[int], n_decode: int) -> None:
        self.eng = Engine(model, create_backend(model, backend))
        self.ids, self.n_decode = ids, n_decode
        self.eng.generate_tokens(ids[:16], max_tokens=2)  # warm-up (lazy init, allocator)
        list(self.eng.generate_tokens(ids[:16], max_tokens=2, temperature=0))
        self.name = f"edge-infer {backend} ({self.eng.backend.device})"

    def run(self) -> tuple[float, float]:
        """(prefill tok/s, decode tok/s) of one run."""
        eng = self.eng
        cache = eng.runner.new_cache()
        t0 = time.perf_counter()
        eng.runner.prefill(self.ids, cache)
        prefill = len(self.ids) / (time.perf_counter() - t0)
        list(
            eng.generate_tokens(self.ids, max_tokens=self.n_decode, temperature=0, ignore_eos=True)
        )
        return prefill, eng.last_usage.decode_tokens_per_s


class LlamaCppRunner:
    """llama-cpp-python on the same GGUF file, greedy, all cores."""

    def __init__(self, path: Path, ids: list[int], n_decode: int) -> None:
        from llama_cpp import Llama

        threads = os.cpu_count() or 1
        self.llm = Llama(
            model_path=str(path),
            n_ctx=2048,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )
        self.ids, self.n_decode = ids, n_decode
        self.n_vocab = self.llm.n_vocab()
        self.llm.reset()
        self.llm.eval(ids[:16])  # warm-up
        self.name = f"llama.cpp {_llama_cpp_version()} (cpu, {threads} threads)"

    def _last_logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.n_vocab,))

    def run(self) -> tuple[float, float]:
        """(prefill tok/s, decode tok/s) of one run."""
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(self.ids)
        prefill = len(self.ids) / (time.perf_counter() - t0)
        token = int(np.argmax(self._last_logits()))
        t0 = time.perf_counter()
        for _ in range(self.n_decode - 1):
            llm.eval([token])
            token = int(np.argmax(self._last_logits()))
        return prefill, (self.n_decode - 1) / (time.perf_counter() - t0)


def _llama_cpp_version() -> str:
    import llama_cpp

    return getattr(llama_cpp, "__version__", "?")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--backends", default="torch,mlx", help="comma-separated edge-infer backends")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    model = load_model(None)
    ids = model.tokenizer.encode(corpus_text())[: args.prompt_tokens]
    runners: list = []
    for backend in [b for b in args.backends.split(",") if b]:
        print(f"loading edge-infer {backend} ...", flush=True)
        runners.append(EdgeRunner(backend, model, ids, args.decode_tokens))
    if importlib.util.find_spec("llama_cpp") is not None:
        print("loading llama.cpp ...", flush=True)
        runners.append(LlamaCppRunner(model.source, ids, args.decode_tokens))
    else:
        print("llama-cpp-python not installed: pip install 'edge-infer[bench]' to compare")
    samples: dict[str, tuple[list[float], list[float]]] = {r.name: ([], []) for r in runners}
    for i in range(args.runs):  # interleaved: a slow spell of the machine hits every engine
        print(f"run {i + 1}/{args.runs} ...", flush=True)
        for runner in runners:
            prefill, decode = runner.run()
            samples[runner.name][0].append(prefill)
            samples[runner.name][1].append(decode)
    results = [
        {"engine": name, "prefill": summarize(p), "decode": summarize(d)}
        for name, (p, d) in samples.items()
    ]

    base = next((r for r in results if r["engine"].startswith("llama.cpp")), None)
    rows = []
    for r in results:
        ratio_p = f"{r['prefill'][0] / base['prefill'][0]:.2f}x" if base else "-"
        ratio_d = f"{r['decode'][0] / base['decode'][0]:.2f}x" if base else "-"
        rows.append(
            [
                r["engine"],
                f"{r['prefill'][0]:.0f} ({r['prefill'][1]:.0f})",
                f"{r['decode'][0]:.1f} ({r['decode'][1]:.1f})",
                ratio_p,
                ratio_d,
            ]
        )
    print_table(
        f"{model.name} ({model.quantization}), prompt {len(ids)} tokens, "
        f"decode {args.decode_tokens} tokens, {args.runs} runs - {machine()}",
        [
            "engine",
            "prefill tok/s median (best)",
            "decode tok/s median (best)",
            "prefill vs llama.cpp",
            "decode vs llama.cpp",
        ],
        rows,
    )
    write_results(args.json, results)


if __name__ == "__main__":
    main()
