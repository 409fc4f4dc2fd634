"""Time to first token with an agent's cache cold, warm (restored from disk in a new process)
and hot (in memory), on the default model or ``--model``; bytes per token Q4 vs FP16; restore
speed.

    python -m benchmarks.cache_restore [--contexts 1024,2048,4096,8192] [--backend torch]
        [--model gemma3-270m --contexts 4096,16384,32768]

Cold: the agent's context (a slice of the Python docs) is prefilled from scratch. Warm: a new
process loads the engine, then restores the agent from disk and answers one more short
question (the clock covers restore + prefill of the new turn + first token; the median of
``--repeats`` such processes). Hot: the same question in the process that still holds the
cache. Restore time is compared with the time
the disk needs to read the agent's files (their size over its O_DIRECT sequential speed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import corpus_text, machine, print_table, temporary_dir, write_results

QUESTION = "Summarise that in one sentence."


def context_message(eng, n_tokens: int) -> str:
    """Text whose chat rendering is about ``n_tokens`` tokens."""
    # a slice long enough (a token is a few characters), without BOS: this is a message
    ids = eng.tokenize(corpus_text()[: 8 * n_tokens], add_bos=False)
    ids = ids[: n_tokens - 160]  # room for the template and a reply
    return eng.detokenize(ids)


def first_piece(agent, message: str) -> float:
    """Run a turn; return the clock when its first text piece arrived."""
    t = None
    for _ in agent.stream(message, temperature=0, max_tokens=4, ignore_eos=True):
        t = t or time.perf_counter()
    return t


def worker(name: str, model: str | None, backend: str, kv_bits: int) -> None:
    """Warm measurement in a fresh process: prints one JSON line."""
    from edge_infer import Engine

    eng = Engine.load(model, backend=backend, kv_bits=kv_bits)
    eng.generate("Hello", max_tokens=2)  # first-call kernel set-up is not part of a restore
    t0 = time.perf_counter()
    agent = eng.agent(name)
    restored = time.perf_counter()
    t1 = first_piece(agent, QUESTION)
    files = list(eng.agent_manager.store.agent_dir(name).glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    result = {
        "ttft": t1 - t0,
        "restore": restored - t0,
        "cached": agent.usage.cached_tokens,
        "bytes": nbytes,
    }
    print(json.dumps(result))


def disk_read_mb_s(folder: Path, size: int = 256 << 20) -> float:
    """Sequential read speed of the disk under ``folder`` (O_DIRECT, bypassing the page
    cache where the filesystem allows it; plain reads otherwise)."""
    import mmap

    path = folder / "disk-speed.bin"
    with open(path, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    buf = mmap.mmap(-1, 4 << 20)  # page-aligned, as O_DIRECT needs
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
    except OSError:
        fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        total = 0
        while n := os.readv(fd, [buf]):
            total += n
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
        path.unlink()
    return total / elapsed / 1e6


def warm_run(name: str, model: str | None, backend: str, kv_bits: int) -> dict:
    """One warm measurement, in a new process."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.cache_restore",
            "--worker",
            name,
            "--backend",
            backend,
            "--kv-bits",
            str(kv_bits),
            *(["--model", model] if model else []),
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"warm-restore worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(n: int, model: str | None, backend: str, kv_bits: int, repeats: int) -> dict:
    from edge_infer import Engine

    eng = Engine.load(model, backend=backend, kv_bits=kv_bits)
    name = f"bench-{n}-q{kv_bits}"
    eng.delete_agent(name)
    agent = eng.agent(name)
    message = context_message(eng, n)
    t0 = time.perf_counter()
    cold = first_piece(agent, message) - t0
    tokens = agent.tokens
    # each warm run continues from the state after the cold turn, in a copy of its own
    copies = [f"{name}-w{i}" for i in range(repeats)]
    for copy in copies:
        eng.delete_agent(copy)
        agent.fork(copy)
    eng.flush()
    disk = next(i.bytes_on_disk for i in eng.agents() if i.name == name)
    t0 = time.perf_counter()
    hot = first_piece(agent, QUESTION) - t0
    hot_cached = agent.usage.cached_tokens
    eng.flush()
    runs = [warm_run(copy, model, backend, kv_bits) for copy in copies]
    warm = {key: statistics.median(r[key] for r in runs) for key in ("ttft", "restore")}
    warm.update(cached=runs[0]["cached"], bytes=runs[0]["bytes"], runs=runs)
    return {
        "n": tokens,
        "cold": cold,
        "hot": hot,
        "hot_cached": hot_cached,
        "warm": warm,
        "disk_bytes": disk,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--contexts", default="1024,2048,4096,8192")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--kv-bits", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="warm runs per context (median)")
    ap.add_argument("--model", help="a model file, folder or packaged key (default: the default)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.backend, args.kv_bits)
        return
    os.environ.setdefault("EDGE_INFER_CACHE_DIR", str(temporary_dir("edge-infer-bench-")))
    disk = disk_read_mb_s(Path(os.environ["EDGE_INFER_CACHE_DIR"]))
    rows, results = [], []
    for n in [int(x) for x in args.contexts.split(",") if x]:
        print(f"context {n} ...", flush=True)
        r = measure(n, args.model, args.backend, args.kv_bits, args.repeats)
        f16 = measure(n, args.model, args.backend, 16, args.repeats) if n == 1024 else None
        results.append({**r, "f16": f16})
        w = r["warm"]
        rows.append(
            [
                str(r["n"]),
                f"{r['cold'] * 1000:.0f}",
                f"{w['ttft'] * 1000:.0f}",
                f"{r['hot'] * 1000:.0f}",
                f"{r['cold'] / w['ttft']:.1f}x",
                f"{r['cold'] / r['hot']:.1f}x",
                f"{r['disk_bytes'] / r['n'] / 1024:.1f}",
                f"{w['restore'] * 1000:.0f}",
                f"{w['bytes'] / w['restore'] / 1e6:.0f}",
                f"{w['restore'] / (w['bytes'] / 1e6 / disk):.2f}x",
            ]
        )
        if f16:
            rows.append(
                [
                    f"{f16['n']} (FP16 KV)",
                    f"{f16['cold'] * 1000:.0f}",
                    f"{f16['warm']['ttft'] * 1000:.0f}",
                    f"{f16['hot'] * 1000:.0f}",
                    f"{f16['cold'] / f16['warm']['ttft']:.1f}x",
                    f"{f16['cold'] / f16['hot']:.1f}x",
                    f"{f16['disk_bytes'] / f16['n'] / 1024:.1f}",
                    f"{f16['warm']['restore'] * 1000:.0f}",
                    "-",
                    "-",
                ]
            )
    print_table(
        f"Agent cache restore, {args.model or 'default model'}, {args.backend}, KV "
        f"{args.kv_bits}-bit, disk reads {disk:.0f} MB/s (O_DIRECT) - {machine()}",
        [
            "context tok",
            "cold TTFT ms",
            "warm TTFT ms",
            "hot TTFT ms",
            "cold/warm",
            "cold/hot",
            "KB/token on disk",
            "restore ms",
            "restore MB/s",
            "restore / (size / disk read)",
        ],
        rows,
    )
    write_results(args.json, results)


if __name__ == "__main__":
    main()
