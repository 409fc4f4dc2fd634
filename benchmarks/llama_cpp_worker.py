"""llama-cpp-python's side of ``benchmarks/generate.py``, run by any Python that has it.

    /path/to/venv/bin/python benchmarks/llama_cpp_worker.py SPEC.json

It imports only the standard library, numpy and llama_cpp (so a separate virtualenv with its
own llama.cpp build, e.g. one for AVX2 only, can run it). It prints one JSON line describing
the engine, then answers each ``run`` line on stdin with one JSON line: prefill and decode
tokens per second, greedy decoding on the same token ids.
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


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
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
