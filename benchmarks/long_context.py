"""Long context on a model with sliding-window layers (Gemma 3 270M): prefill a long prompt of
real text in chunks in a fresh process, report peak RSS and KV bytes (global layers, window
layers, and what the window layers would hold if they kept every block), persist it as a
prefix cache, restore it in a new process and check that greedy decoding continues
token-identically.

usage: python -m benchmarks.long_context [--model gemma3-270m] [--tokens 24576]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import corpus_text, machine, print_table, temporary_dir

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _prompt(engine, n: int) -> list[int]:
    ids = engine.tokenize(corpus_text())
    if len(ids) < n:
        raise SystemExit(f"the corpus has only {len(ids)} tokens")
    return ids[:n]


def _kv_bytes(cache) -> dict[str, int]:
    """What the torch cache holds, and what its window layers would hold keeping every block
    (as a global layer of the same cache does)."""
    local = [i for i, w in enumerate(cache.windows) if w]
    glob = [i for i, w in enumerate(cache.windows) if not w]
    per_global = cache.buffer_nbytes(glob) // max(1, len(glob))
    return {
        "global": cache.buffer_nbytes(glob),
        "local": cache.buffer_nbytes(local),
        "hidden": cache.hidden_nbytes(),
        "local_unbounded": per_global * len(local),
    }


def child(args) -> None:
    """One fresh process: ``agent`` prefills and persists, ``bare`` prefills a cache that
    keeps nothing out of its window, ``restore`` continues a persisted one."""
    from edge_infer import Engine, SamplingParams

    engine = Engine.load(args.model, backend="torch")
    ids = _prompt(engine, args.tokens)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.new)
    base = _peak_rss()
    out: dict = {"mode": args.child}
    t0 = time.perf_counter()
    if args.child == "bare":
        runner = engine.runner
        cache = runner.new_cache()
        for a in range(0, len(ids), runner.prefill_chunk):
            runner.prefill(ids[a : a + runner.prefill_chunk], cache)
            cache.release_hidden()  # nobody keeps the blocks: only the windows stay
        out["kv"] = _kv_bytes(cache)
    else:
        turn = engine.start_prefix_turn("long", ids, greedy)
        "".join(turn.stream())
        out["kv"] = _kv_bytes(turn.cache)
        out["generated"] = list(turn.generation.generated)
        turn.finish()
        engine.flush()
        out["cached"] = turn.usage.cached_tokens
        out["blocks_in_memory"] = sum(i.bytes_in_memory for i in engine.agents())
    out["seconds"] = time.perf_counter() - t0
    out["rss_model"], out["rss_peak"] = base, _peak_rss()
    print(json.dumps(out))


def run_child(mode: str, args, cache_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.long_context", "--child", mode]
    cmd += ["--model", args.model, "--tokens", str(args.tokens), "--new", str(args.new)]
    env = {**os.environ, "EDGE_INFER_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--tokens", type=int, default=24576)
    p.add_argument("--new", type=int, default=8, help="greedy tokens compared after restore")
    p.add_argument("--child", choices=("agent", "bare", "restore"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    cache_dir = temporary_dir("edge-infer-long-")
    runs = {m: run_child(m, args, cache_dir) for m in ("bare", "agent", "restore")}
    rows = []
    for mode, r in runs.items():
        kv = r["kv"]
        rows.append(
            [
                mode,
                f"{r['seconds']:.0f}",
                f"{r['rss_model'] / MiB:.0f}",
                f"{r['rss_peak'] / MiB:.0f}",
                f"{kv['global'] / MiB:.1f}",
                f"{kv['local'] / MiB:.1f}",
                f"{kv['hidden'] / MiB:.1f}",
                f"{kv['local_unbounded'] / MiB:.1f}",
                f"{r.get('blocks_in_memory', 0) / MiB:.1f}",
            ]
        )
    print_table(
        f"{args.tokens}-token prompt, {args.model}, torch CPU ({machine()}; shared, busy)",
        [
            "run",
            "s",
            "RSS after load MiB",
            "peak RSS MiB",
            "KV global MiB",
            "KV window layers MiB",
            "hidden MiB",
            "window layers unbounded MiB",
            "agent blocks MiB",
        ],
        rows,
    )
    same = runs["agent"]["generated"] == runs["restore"]["generated"]
    print(
        f"\nrestore in a new process: {runs['restore']['cached']} of {args.tokens} tokens "
        f"cached; {args.new} greedy tokens {'identical' if same else 'DIFFER'} "
        f"({runs['agent']['generated']} vs {runs['restore']['generated']})"
    )
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
