"""Prefill and decode speed of edge-infer next to llama.cpp, per CPU instruction-set class.

    python -m benchmarks.generate [--isa native,avx2] [--prompt-tokens 512] [--decode-tokens 128]
        [--runs 3] [--threads 2] [--llama-python native=/tmp/llama-native/bin/python
        --llama-python avx2=/tmp/llama-avx2/bin/python] [--llama-kv f16,q4_0] [--busy]
        [--model gemma3-270m] [--baseline PATH-OF-ANOTHER-CHECKOUT]

Each engine gets the same token ids (a slice of the Python docs), greedy decoding with
end-of-sequence ignored, on the same GGUF file (the default model unless ``--model`` names
a file or a packaged model). Every engine runs in its own process:

* edge-infer with its kernels built for the class (``EDGE_INFER_KERNEL_ARCH``) and, for
  ``avx2``, torch held to AVX2 as well (``ATEN_CPU_CAPABILITY``, ``MKL_ENABLE_INSTRUCTIONS``,
  ``ONEDNN_MAX_CPU_ISA``);
* llama.cpp through ``benchmarks/llama_cpp_worker.py`` run by the Python given for the class
  with ``--llama-python CLASS=PATH`` (a virtualenv whose llama-cpp-python was built for it,
  e.g. ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
  -DGGML_AVX512=OFF"`` for AVX2), or by this Python when llama_cpp is installed here.

The engines take turns, one run each per round, so that a slow spell of a shared machine hits
all of them. Throughputs are medians (and bests) over the runs; ratios compare medians
measured in this one run. Decode is also given as weight bytes streamed per second, next to
the machine's memory read bandwidth measured here (the limit decoding cannot pass). ``--busy``
keeps one core busy with a second process (``python -c "while True: pass"``) while measuring.
For long prompts use e.g. ``--prompt-tokens 4000 --decode-tokens 0 --llama-kv f16,q4_0``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

from benchmarks.common import (
    corpus_text,
    machine,
    print_table,
    summarize,
    temporary_dir,
    write_results,
)

AVX2_ENV = {
    "EDGE_INFER_KERNEL_ARCH": "avx2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
WORKER = Path(__file__).with_name("llama_cpp_worker.py")
ROOT = str(Path(__file__).resolve().parent.parent)


def edge_worker(spec_path: str) -> None:
    """One edge-infer engine in this process: a JSON line about it, then one per ``run``."""
    import torch

    from edge_infer.backends.select import create_backend
    from edge_infer.backends.torch.backend import TorchBackend
    from edge_infer.engine import Engine
    from edge_infer.kernels import cpu as cpu_kernels
    from edge_infer.models.loader import load_model

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    model = load_model(spec["model"])
    eng = Engine(model, create_backend(model, spec["backend"]))
    ids, n_decode = spec["ids"], spec["decode_tokens"]
    list(eng.generate_tokens(ids[:16], max_tokens=2, temperature=0))  # warm-up
    kernel = cpu_kernels.load()
    isa = kernel.isa() if kernel is not None else "no kernels"
    name = f"edge-infer {spec['backend']} ({isa}, {spec['threads']} threads)"
    backend = eng.backend
    weight_bytes = backend.decoder.weight_bytes if isinstance(backend, TorchBackend) else 0
    print(json.dumps({"name": name, "weight_bytes": weight_bytes}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        cache = eng.runner.new_cache()
        t0 = time.perf_counter()
        eng.runner.prefill(ids, cache)
        prefill = len(ids) / (time.perf_counter() - t0)
        decode = 0.0
        if n_decode > 1:
            tokens = eng.generate_tokens(ids, max_tokens=n_decode, temperature=0, ignore_eos=True)
            list(tokens)
            decode = eng.last_usage.decode_tokens_per_s
        print(json.dumps({"prefill": prefill, "decode": decode}), flush=True)


class Engine:
    """A benchmark worker process; :meth:`run` asks it for one measurement."""

    def __init__(
        self, isa: str, cmd: list[str], env: dict[str, str], cwd: str = ROOT, tag: str = ""
    ) -> None:
        self.isa = isa
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd
        )
        info = self._answer()
        self.name, self.weight_bytes = info["name"] + tag, info["weight_bytes"]
        self.prefill: list[float] = []
        self.decode: list[float] = []

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"benchmark worker {self.proc.args[:3]} stopped (see its errors)")
        return json.loads(line)

    def run(self) -> None:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        r = self._answer()
        self.prefill.append(r["prefill"])
        self.decode.append(r["decode"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def memory_bandwidth(threads: int) -> float:
    """Read bandwidth in GB/s: the best of several sums over a 512 MiB array."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(128 * 1024 * 1024)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * x.element_size() / best / 1e9


def _llama_pythons(args) -> dict[str, str]:
    found: dict[str, str] = {}
    for item in args.llama_python:
        isa, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--llama-python {item!r}: expected CLASS=PATH")
        found[isa] = path
    if importlib.util.find_spec("llama_cpp") is not None:
        found.setdefault("native", sys.executable)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--isa", default="native", help="comma-separated: native, avx2")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--backends", default="torch", help="comma-separated edge-infer backends")
    ap.add_argument(
        "--llama-python",
        action="append",
        default=[],
        metavar="CLASS=PATH",
        help="the Python of a virtualenv with llama-cpp-python built for CLASS",
    )
    ap.add_argument("--llama-kv", default="f16", help="llama.cpp KV types: f16, q8_0, q4_0")
    ap.add_argument("--busy", action="store_true", help="keep one core busy meanwhile")
    ap.add_argument("--model", help="a GGUF file or packaged model key (default: the default)")
    ap.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of edge-infer measured beside this one (before/after a change)",
    )
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        edge_worker(args.worker)
        return

    from edge_infer.models.loader import load_model

    model = load_model(args.model)
    ids = model.tokenizer.encode(corpus_text())[: args.prompt_tokens]
    folder = temporary_dir("edge-infer-bench-")
    llama_pythons = _llama_pythons(args)
    engines: list[Engine] = []
    for isa in [x for x in args.isa.split(",") if x]:
        env = dict(os.environ, **(AVX2_ENV if isa == "avx2" else {"EDGE_INFER_KERNEL_ARCH": isa}))
        checkouts = [(ROOT, "")]
        if args.baseline:
            checkouts.append((str(args.baseline.resolve()), " [baseline]"))
        for (root, tag), backend in product(checkouts, [b for b in args.backends.split(",") if b]):
            spec = folder / f"edge-{isa}-{backend}.json"
            spec.write_text(
                json.dumps(
                    {
                        "backend": backend,
                        "model": args.model,
                        "ids": ids,
                        "decode_tokens": args.decode_tokens,
                        "threads": args.threads,
                    }
                )
            )
            print(f"loading edge-infer{tag} {backend} for {isa} ...", flush=True)
            cmd = [sys.executable, "-m", "benchmarks.generate", "--worker", str(spec)]
            # the checkout's own code: first on the path and the folder `-m` runs in
            env_here = dict(env, PYTHONPATH=os.pathsep.join([root, env.get("PYTHONPATH", "")]))
            engines.append(Engine(isa, cmd, env_here, cwd=root, tag=tag))
        python = llama_pythons.get(isa)
        if python is None:
            print(f"no llama-cpp-python for {isa}: give --llama-python {isa}=PATH to compare")
            continue
        for kv in [k for k in args.llama_kv.split(",") if k]:
            spec = folder / f"llama-{isa}-{kv}.json"
            spec.write_text(
                json.dumps(
                    {
                        "model": str(model.source),
                        "model_bytes": Path(model.source).stat().st_size,
                        "ids": ids,
                        "decode_tokens": args.decode_tokens,
                        "threads": args.threads,
                        "kv": kv,
                    }
                )
            )
            print(f"loading llama.cpp for {isa} ({kv} KV) ...", flush=True)
            engines.append(Engine(isa, [python, str(WORKER), str(spec)], dict(os.environ)))

    bandwidth = memory_bandwidth(args.threads)
    busy = None
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        for i in range(args.runs):  # interleaved: a slow spell of the machine hits every engine
            print(f"run {i + 1}/{args.runs} ...", flush=True)
            for eng in engines:
                eng.run()
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
        for eng in engines:
            eng.close()

    results = []
    label = (
        model.name if model.quantization in model.name else f"{model.name} ({model.quantization})"
    )
    for isa in dict.fromkeys(e.isa for e in engines):
        group = [e for e in engines if e.isa == isa]
        base = next((e for e in group if e.name.startswith("llama.cpp")), None)
        rows = []
        for e in group:
            p, d = summarize(e.prefill), summarize(e.decode)
            row = {"isa": isa, "engine": e.name, "prefill": p, "decode": d}
            row["decode_gb_s"] = d[0] * e.weight_bytes / 1e9
            results.append(row)
            rows.append(
                [
                    e.name,
                    f"{p[0]:.0f} ({p[1]:.0f})",
                    f"{d[0]:.1f} ({d[1]:.1f})",
                    f"{p[0] / summarize(base.prefill)[0]:.2f}x" if base else "-",
                    f"{d[0] / summarize(base.decode)[0]:.2f}x" if base and d[0] else "-",
                    f"{row['decode_gb_s']:.1f}" if d[0] else "-",
                ]
            )
        print_table(
            f"{isa}: {label}, prompt {len(ids)} tokens, decode "
            f"{args.decode_tokens} tokens, {args.runs} runs"
            f"{', one core kept busy' if args.busy else ''} - {machine()}",
            [
                "engine",
                "prefill tok/s median (best)",
                "decode tok/s median (best)",
                "prefill vs llama.cpp",
                "decode vs llama.cpp",
                "decode weight GB/s",
            ],
            rows,
        )
    print(f"\nmemory read bandwidth ({args.threads} threads): {bandwidth:.1f} GB/s")
    write_results(args.json, {"bandwidth_gb_s": bandwidth, "engines": results})


if __name__ == "__main__":
    main()
