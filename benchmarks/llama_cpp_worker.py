"""llama-cpp-python's side of ``benchmarks/generate.py`` and of ``benchmarks/long_context.py
--passkey``, run by any Python that has it.

    /path/to/venv/bin/python benchmarks/llama_cpp_worker.py SPEC.json

It imports only the standard library, numpy and llama_cpp (so a separate virtualenv with its
own llama.cpp build, e.g. one for AVX2 only, can run it). For ``generate.py`` it prints one
JSON line describing the engine, then answers each ``run`` line on stdin with one JSON line:
prefill and decode tokens per second, greedy decoding on the same token ids. A spec with
``trials`` (passkey prompts as token ids) gets one JSON line per trial: the greedy answer's ids.
"""

from __future__ import annotations

import json
import sys
import time

import llama_cpp
import numpy as np

KV_TYPES = {
    "f16": llama_cpp.GGML_TYPE_F16,
    "q8_0": llama_cpp.GGML_TYPE_Q8_0,
    "q4_0": llama_cpp.GGML_TYPE_Q4_0,
}


def passkey(spec: dict) -> None:
    """Greedy answers to each trial's prompt; the cache is cut back to the prefix a prompt
    shares with the one before (the window layers keep every position, ``swa_full``, so that
    it can be)."""
    trials, n_new, threads = spec["trials"], spec["new"], spec["threads"]
    kv = spec.get("kv", "f16")
    llm = llama_cpp.Llama(
        model_path=spec["model"],
        n_ctx=max(len(t["ids"]) for t in trials) + n_new + 16,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        type_k=KV_TYPES[kv],
        type_v=KV_TYPES[kv],
        flash_attn=kv != "f16",
        swa_full=True,
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    version = getattr(llama_cpp, "__version__", "?")
    held: list[int] = []
    for trial in trials:
        ids = trial["ids"]
        t0 = time.perf_counter()
        reused = 0
        while reused < min(len(held), len(ids) - 1) and held[reused] == ids[reused]:
            reused += 1
        if not llm._ctx.kv_cache_seq_rm(-1, reused, -1):
            reused = 0
        llm.n_tokens = reused
        llm.eval(ids[reused:])
        out: list[int] = []
        while True:
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
            out.append(int(np.argmax(logits)))
            if len(out) == n_new:
                break
            llm.eval([out[-1]])
        held = ids + out[:-1]
        seconds = time.perf_counter() - t0
        line = {"answer": out, "reused": reused, "seconds": seconds, "version": version}
        print(json.dumps(line), flush=True)
        print(
            f"llama.cpp: depth {trial['depth']:.0%} key {trial['key']}: {seconds:.0f} s",
            file=sys.stderr,
            flush=True,
        )


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    if "trials" in spec:
        passkey(spec)
        return
    ids, n_decode, threads = spec["ids"], spec["decode_tokens"], spec["threads"]
    kv = spec.get("kv", "f16")
    llm = llama_cpp.Llama(
        model_path=spec["model"],
        n_ctx=len(ids) + n_decode + 16,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        type_k=KV_TYPES[kv],
        type_v=KV_TYPES[kv],
        flash_attn=kv != "f16",  # a quantized V cache needs flash attention
        verbose=False,
    )
    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(ids[:16])  # warm-up

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))

    version = getattr(llama_cpp, "__version__", "?")
    name = f"llama.cpp {version} ({threads} threads, {kv} KV)"
    print(json.dumps({"name": name, "weight_bytes": spec.get("model_bytes", 0)}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        prefill = len(ids) / (time.perf_counter() - t0)
        decode = 0.0
        if n_decode > 1:
            token = int(np.argmax(last_logits()))
            t0 = time.perf_counter()
            for _ in range(n_decode - 1):
                llm.eval([token])
                token = int(np.argmax(last_logits()))
            decode = (n_decode - 1) / (time.perf_counter() - t0)
        print(json.dumps({"prefill": prefill, "decode": decode}), flush=True)


if __name__ == "__main__":
    main()
