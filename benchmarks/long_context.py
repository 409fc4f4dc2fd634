"""Long context on a model with sliding-window layers (Gemma 3 270M): memory and restore of a
long prompt, or passkey retrieval next to llama.cpp.

    python -m benchmarks.long_context [--model gemma3-270m] [--tokens 24576]
    python -m benchmarks.long_context --passkey [--tokens 16384] [--trials 5]
        [--depths 0.1,0.5,0.9] [--llama-python /path/to/venv/bin/python] [--threads 2]
        [--serial] [--json PATH]

Default: prefill a long prompt of real text in chunks in a fresh process, report peak RSS and
KV bytes (global layers, window layers, and what the window layers would hold if they kept
every block), persist it as a prefix cache, restore it in a new process and check that greedy
decoding continues token-identically.

``--passkey``: the classic passkey test. A 5-digit key hidden at each ``--depths`` share of
``--tokens`` tokens of filler sentences, then "What is the pass key? The pass key is"; the
same token ids go to edge-infer (torch, KV in each of ``--kv-bits``) and to llama.cpp
(llama-cpp-python run by ``--llama-python``, same GGUF file, f16 KV with a full-size window
cache so that a prefix can be cut back), each in its own process, both at once unless
``--serial``. Greedy decoding of ``--new`` tokens; a trial is a hit when the first 5-digit
number of the answer is the key. The trials of one depth share everything before the key
(which starts on a block boundary): each engine keeps its cache and cuts it back to the
prefix it shares with the next prompt, so only the key and what follows are prefilled again.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import subprocess
import sys
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
from edge_infer.cache_store.kv_format import row_nbytes

REPO = Path(__file__).resolve().parent.parent
LLAMA_WORKER = Path(__file__).with_name("llama_cpp_worker.py")
MiB = 1 << 20
PASSKEY_ALIGN = 256  # the KV block size: a cache cut back to the key's start is exact


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
    row = [row_nbytes(b, cache.head_dim, cache.group_size) for b in cache.layer_bits]
    return {
        "global": cache.buffer_nbytes(glob),
        "local": cache.buffer_nbytes(local),
        "hidden": cache.hidden_nbytes(),
        "local_unbounded": sum(2 * cache.n_kv * cache.sealed_length * row[i] for i in local),
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


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` have in common."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def passkey_worker(spec_path: str, kv_bits: int) -> None:
    """edge-infer's side of ``--passkey``: one JSON line per trial (the answer's ids)."""
    import torch

    from edge_infer import Engine

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    engine = Engine.load(spec["model"], backend="torch", kv_bits=kv_bits)
    cache = engine.runner.new_cache()
    held: list[int] = []
    for trial in spec["trials"]:
        ids = trial["ids"]
        t0 = time.perf_counter()
        reused = cache.truncate(min(shared_prefix(held, ids), len(ids) - 1))
        out = [
            tok
            for tok, _ in engine.generate_tokens(
                ids, cache=cache, temperature=0.0, max_tokens=spec["new"], ignore_eos=True
            )
            if tok is not None
        ]
        held = (ids + out)[: cache.length]
        seconds = time.perf_counter() - t0
        print(json.dumps({"answer": out, "reused": reused, "seconds": seconds}), flush=True)
        print(
            f"edge-infer KV{kv_bits}: depth {trial['depth']:.0%} key {trial['key']}: "
            f"{seconds:.0f} s",
            file=sys.stderr,
            flush=True,
        )


def _collect(proc: subprocess.Popen, what: str) -> list[dict]:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{what} passkey worker failed (exit {proc.returncode})")
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _llama_python(given: str | None) -> str:
    if given:
        return given
    if importlib.util.find_spec("llama_cpp") is not None:
        return sys.executable
    raise SystemExit("--passkey: give --llama-python PATH (a Python with llama-cpp-python)")


def passkey(args) -> None:
    """Retrieval per depth, edge-infer next to llama.cpp on the same token ids."""
    from edge_infer.models.loader import load_model

    model = load_model(args.model)
    rng = np.random.default_rng(args.seed)
    depths = [float(d) for d in args.depths.split(",") if d]
    trials = []
    for depth in depths:
        for key in rng.integers(10000, 100000, size=args.trials):
            prompt = passkey_prompt(
                model.tokenizer.encode, args.tokens, depth, int(key), PASSKEY_ALIGN
            )
            trials.append({"depth": depth, "key": prompt.key, "ids": prompt.ids})
    tokenizer, source = model.tokenizer, str(model.source)
    del model
    folder = temporary_dir("edge-infer-passkey-")
    spec = folder / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "model": source,
                "trials": trials,
                "new": args.new,
                "threads": args.threads,
                "kv": "f16",
            }
        )
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    bits = [int(b) for b in args.kv_bits.split(",") if b]
    worker = [sys.executable, "-m", "benchmarks.long_context", "--passkey-worker", str(spec)]
    commands = {f"edge-infer KV{b}": [*worker, "--kv-bits", str(b)] for b in bits}
    commands["llama.cpp"] = [_llama_python(args.llama_python), str(LLAMA_WORKER), str(spec)]
    ours = [name for name in commands if name != "llama.cpp"]
    t0 = time.perf_counter()
    answers: dict[str, list[dict]] = {}
    procs = {}
    for name, cmd in commands.items():
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        if args.serial:
            answers[name] = _collect(procs.pop(name), name)
    for name, proc in procs.items():
        answers[name] = _collect(proc, name)
    elapsed = time.perf_counter() - t0
    version = answers["llama.cpp"][0].get("version", "?") if answers["llama.cpp"] else "?"

    def hit(out: list[int], key: int) -> bool:
        found = re.search(r"\d{5}", tokenizer.decode(out, skip_special=True))
        return bool(found and int(found.group()) == key)

    rows, results = [], []
    for depth in depths:
        idx = [i for i, t in enumerate(trials) if t["depth"] == depth]
        row = {"depth": depth, "tokens": len(trials[idx[0]]["ids"]), "trials": len(idx)}
        for name in commands:
            got = [answers[name][i] for i in idx]
            row[name] = {
                "hits": sum(
                    hit(g["answer"], trials[i]["key"]) for g, i in zip(got, idx, strict=True)
                ),
                "answers": [tokenizer.decode(g["answer"], skip_special=True) for g in got],
                "seconds": [g["seconds"] for g in got],
                "reused": [g["reused"] for g in got],
            }
        for name in ours:
            row[name]["same_as_llama_cpp"] = sum(
                answers[name][i]["answer"] == answers["llama.cpp"][i]["answer"] for i in idx
            )
        results.append(row)
        rows.append(
            [f"{depth:.0%}", str(row["tokens"])]
            + [f"{row[name]['hits']}/{len(idx)}" for name in commands]
            + [f"{row[name]['same_as_llama_cpp']}/{len(idx)}" for name in ours]
            + [f"{np.median(row[name]['seconds']):.0f}" for name in commands]
        )
    print_table(
        f"Passkey retrieval, {args.model}, {args.tokens} tokens, greedy {args.new} tokens, "
        f"{args.trials} keys per depth (seed {args.seed}); edge-infer torch, llama.cpp "
        f"{version} f16 KV; {args.threads} threads each, "
        f"{'one after the other' if args.serial else 'all at once'}, {elapsed:.0f} s in all",
        ["depth", "tokens"]
        + [f"{name} hits" for name in commands]
        + [f"{name} same answer as llama.cpp" for name in ours]
        + [f"{name} s/trial" for name in commands],
        rows,
    )
    for r in results:
        for name in commands:
            print(f"{r['depth']:.0%} {name}: {r[name]['answers']}")
    print(f"\n{machine()}")
    write_results(args.json, {"passkey": results, "model": args.model, "tokens": args.tokens})


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--tokens", type=int, help="prompt tokens (24576; 16384 with --passkey)")
    p.add_argument("--new", type=int, default=8, help="greedy tokens generated and compared")
    p.add_argument("--passkey", action="store_true", help="passkey retrieval vs llama.cpp")
    p.add_argument("--trials", type=int, default=5, help="passkey keys per depth")
    p.add_argument("--depths", default="0.1,0.5,0.9")
    p.add_argument("--seed", type=int, default=0, help="passkey keys")
    p.add_argument(
        "--kv-bits", default="4", help="edge-infer KV bits, comma-separated (passkey: 4,8,16)"
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--llama-python", help="a Python with llama-cpp-python (passkey)")
    p.add_argument("--serial", action="store_true", help="passkey engines one after the other")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", choices=("agent", "bare", "restore"), help=argparse.SUPPRESS)
    p.add_argument("--passkey-worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.passkey_worker:
        passkey_worker(args.passkey_worker, int(args.kv_bits))
        return
    if args.tokens is None:
        args.tokens = 16384 if args.passkey else 24576
    if args.passkey:
        passkey(args)
        return
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
        f"{args.tokens}-token prompt, {args.model}, torch CPU ({machine()})",
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
