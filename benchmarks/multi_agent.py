"""Several agents at once, on the default model with 4-bit KV caches.

    python -m benchmarks.multi_agent [--agents 1,2,4,8] [--tokens 64] [--context 256]
                                     [--workflow-agents 10] [--workflow-context 2048]

1. Decode: N agents, each with its own context, generate ``--tokens`` tokens each (greedy,
   end-of-sequence ignored). Batched: one forward pass per step for all N. Sequential: one
   agent after another. Only decoding is timed (prefill is the same work either way);
   aggregate tok/s = all tokens generated / time.
2. Workflow: ``--workflow-agents`` agents, each holding a conversation of about
   ``--workflow-context`` tokens, each answer one more question (16 tokens). Persistent: a
   fresh engine restores each agent from disk, runs the turn and saves it (one after another,
   and all together with ``chat_many``). Re-prefill: no caches; each agent's whole
   conversation is prefilled again for its turn, as a stateless runtime must.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

from benchmarks.common import corpus_text, machine, print_table, temporary_dir, write_results

QUESTION = "Summarise that in one sentence."
TURN_TOKENS = 16


def contexts(eng, n: int, size: int) -> list[str]:
    """``n`` different slices of real text, each about ``size`` tokens."""
    ids = eng.tokenize(corpus_text())
    need = n * size
    if len(ids) < need:
        raise SystemExit(f"the corpus has {len(ids)} tokens; {need} needed")
    return [eng.detokenize(ids[i * size : (i + 1) * size]) for i in range(n)]


# -- 1. decode throughput -----------------------------------------------------------------------


def _generations(eng, prompts: list[list[int]], tokens: int):
    from edge_infer.generation.sampling import SamplingParams
    from edge_infer.generation.sequence import Generation, Usage

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    gens = [Generation(eng.runner, p, params, eng.runner.new_cache(), Usage()) for p in prompts]
    for g in gens:
        g.prefill()
    return gens


def decode_sequential(eng, prompts: list[list[int]], tokens: int) -> tuple[float, list]:
    from edge_infer.generation.batch import forward_step

    elapsed, outs = 0.0, []
    for g in _generations(eng, prompts, tokens):
        t0 = time.perf_counter()
        while not g.finished:
            g.sample()
            forward_step(eng.runner, [g])
        elapsed += time.perf_counter() - t0
        outs.append(g.generated)
    return elapsed, outs


def decode_batched(eng, prompts: list[list[int]], tokens: int) -> tuple[float, list]:
    from edge_infer.generation.batch import forward_step

    gens = _generations(eng, prompts, tokens)
    t0 = time.perf_counter()
    while any(not g.finished for g in gens):
        for g in gens:
            if not g.finished:
                g.sample()
        forward_step(eng.runner, gens)
    return time.perf_counter() - t0, [g.generated for g in gens]


def bench_decode(eng, counts: list[int], tokens: int, context: int, repeats: int) -> list[dict]:
    texts = contexts(eng, max(counts), context)
    prompts = [eng.chat_ids([{"role": "user", "content": t}]) for t in texts]
    results = []
    for n in counts:
        seq, bat = [], []
        for _ in range(repeats):
            t_seq, out_seq = decode_sequential(eng, prompts[:n], tokens)
            t_bat, out_bat = decode_batched(eng, prompts[:n], tokens)
            if out_seq != out_bat:
                raise SystemExit(f"batched output differs from sequential with {n} agents")
            seq.append(n * tokens / t_seq)
            bat.append(n * tokens / t_bat)
        s, b = statistics.median(seq), statistics.median(bat)
        results.append({"agents": n, "sequential_tok_s": s, "batched_tok_s": b, "ratio": b / s})
        print(f"  {n} agents: sequential {s:.0f} tok/s, batched {b:.0f} tok/s", flush=True)
    return results


# -- 2. the 10-agent workflow ---------------------------------------------------------------------


def bench_workflow(model, backend, n: int, context: int) -> dict:
    from edge_infer import Engine

    params = {"temperature": 0, "max_tokens": TURN_TOKENS, "ignore_eos": True}
    root = Path(os.environ["EDGE_INFER_CACHE_DIR"])
    setup = Engine(model, backend)
    names = [f"worker-{i}" for i in range(n)]
    histories = {}
    print(f"  setting up {n} agents of ~{context} tokens...", flush=True)
    for name, text in zip(names, contexts(setup, n, context), strict=True):
        agent = setup.agent(name)
        agent.chat(f"Read this:\n\n{text}", max_tokens=8, temperature=0)
        histories[name] = agent.messages
    setup.flush()
    pristine = temporary_dir("edge-infer-bench-") / "agents"
    shutil.copytree(root / "agents", pristine)

    def restore_disk() -> None:
        shutil.rmtree(root / "agents")
        shutil.copytree(pristine, root / "agents")

    def persistent_one_by_one() -> float:
        restore_disk()
        eng = Engine(model, backend)  # nothing in memory: every agent comes from disk
        t0 = time.perf_counter()
        for name in names:
            eng.agent(name).chat(QUESTION, **params)
            eng.flush(name)
        return time.perf_counter() - t0

    def persistent_together() -> float:
        restore_disk()
        eng = Engine(model, backend)
        t0 = time.perf_counter()
        eng.chat_many({name: QUESTION for name in names}, **params)
        eng.flush()
        return time.perf_counter() - t0

    def reprefill() -> float:
        eng = Engine(model, backend)
        t0 = time.perf_counter()
        for name in names:
            eng.chat(histories[name] + [{"role": "user", "content": QUESTION}], **params)
        return time.perf_counter() - t0

    times = {
        "reprefill_s": reprefill(),
        "persistent_sequential_s": persistent_one_by_one(),
        "persistent_batched_s": persistent_together(),
    }
    shutil.rmtree(pristine.parent, ignore_errors=True)
    return {"agents": n, "context_tokens": context, "turn_tokens": TURN_TOKENS, **times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workflow-agents", type=int, default=10, help="0 skips the workflow")
    ap.add_argument("--workflow-context", type=int, default=2048)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    os.environ["EDGE_INFER_CACHE_DIR"] = str(temporary_dir("edge-infer-bench-cache-"))

    from edge_infer import Engine

    eng = Engine.load(backend=args.backend, kv_bits=4)
    eng.generate("Hello", max_tokens=4)  # warm up kernels
    print(f"{eng.model.name} on {eng.backend.name}/{eng.backend.device}, 4-bit KV; {machine()}")
    counts = [int(c) for c in args.agents.split(",")]
    decode = bench_decode(eng, counts, args.tokens, args.context, args.repeats)
    print_table(
        f"Decode, {args.tokens} tokens per agent, contexts of ~{args.context} tokens "
        f"(median of {args.repeats})",
        ["agents", "one after another", "batched", "batched / sequential"],
        [
            [
                str(r["agents"]),
                f"{r['sequential_tok_s']:.0f} tok/s",
                f"{r['batched_tok_s']:.0f} tok/s",
                f"{r['ratio']:.2f}x",
            ]
            for r in decode
        ],
    )
    if args.workflow_agents < 1:
        write_results(args.json, {"decode": decode})
        return
    flow = bench_workflow(eng.model, eng.backend, args.workflow_agents, args.workflow_context)
    re = flow["reprefill_s"]
    print_table(
        f"Workflow: {flow['agents']} agents x (~{flow['context_tokens']}-token conversation, "
        f"one turn of {TURN_TOKENS} tokens)",
        ["mode", "time", "speed-up vs re-prefill"],
        [
            ["re-prefill, no persistence", f"{re:.2f} s", "1.0x"],
            [
                "restore + turn + save, one by one",
                f"{flow['persistent_sequential_s']:.2f} s",
                f"{re / flow['persistent_sequential_s']:.1f}x",
            ],
            [
                "restore + batched turns + save",
                f"{flow['persistent_batched_s']:.2f} s",
                f"{re / flow['persistent_batched_s']:.1f}x",
            ],
        ],
    )
    write_results(args.json, {"decode": decode, "workflow": flow})
    shutil.rmtree(os.environ["EDGE_INFER_CACHE_DIR"], ignore_errors=True)


if __name__ == "__main__":
    main()
