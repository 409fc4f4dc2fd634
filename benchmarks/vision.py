"""What early visual-token dropping saves: one image, one prompt, every dropping method.

    python -m benchmarks.vision [--shape smolvlm|llava-next|both] [--image 1024x768]
                                [--decode-tokens 16] [--vision-layers N] [--json PATH]
                                [--text-model default|llama-1b|llama-7b]

Vision towers and projectors have real shapes but random weights (no VLM weights can be had
here), so the table measures cost, not answer quality. The text model is the default model's
real SmolLM2-135M (Q4_1) on our torch backend unless ``--text-model`` names a Llama shape:
then a GGUF of that shape with random Q4_0 weights (and the default model's tokenizer) is
written to a temporary folder and loaded like any user's file. ``llama-7b`` is the shape of
LLaVA-NeXT-7B's Vicuna text model, where the language model, not the tower, dominates prefill.
The projector maps into the text model's embeddings. Shapes: SmolVLM-256M's SigLIP-B/16 at
512 px (pixel shuffle 4, 64 tokens a tile, tiles plus a global image) and LLaVA-NeXT's
CLIP-L/14-336 (anyres: base view plus tiles, unpadded, newline per row). TTFT = preprocessing +
vision encoder + LLM prefill. KV bytes are the prompt's keys and values in the cache's 4-bit
form (values plus per-group scales).
Peak memory is the process's resident set high-water mark during the run, sampled.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import machine, print_table, temporary_dir, write_results
from edge_infer.backends.select import create_backend
from edge_infer.generation.runner import Runner
from edge_infer.models.loader import load_model
from edge_infer.vision.dropping import Budget
from edge_infer.vision.preprocess import HALF, ImageSpec, preprocess
from edge_infer.vision.spec import TowerSpec, VisionSpec
from edge_infer.vision.torch.model import VisionModel

# Llama shapes for a random text model: hidden, layers, heads, kv heads, feed-forward
TEXT_SHAPES = {
    "llama-1b": (2048, 22, 32, 4, 5632),  # TinyLlama-1.1B
    "llama-7b": (4096, 32, 32, 32, 11008),  # Vicuna-7B, LLaVA-NeXT-7B's text model
}

METHODS = [
    ("full", "full", 1.0),
    ("HiRED 50%", "hired", 0.5),
    ("HiRED 20%", "hired", 0.2),
    ("HiRED 10%", "hired", 0.1),
    ("uniform 20%", "uniform", 0.2),
    ("cls-topk 20%", "cls-topk", 0.2),
]


def shapes(text_hidden: int, layers: int | None) -> dict[str, tuple[VisionSpec, ImageSpec]]:
    siglip = TowerSpec(768, 12, layers or 12, 3072, 16, 512, 1e-6, "gelu_pytorch_tanh", False)
    clip = TowerSpec(1024, 16, layers or 24, 4096, 14, 336, 1e-5, "quick_gelu", True)
    return {
        "smolvlm": (
            VisionSpec("idefics3", siglip, text_hidden, 0, scale_factor=4),
            ImageSpec(
                kind="idefics3",
                resample=Image.Resampling.LANCZOS,
                mean=HALF,
                std=HALF,
                do_center_crop=False,
                size={"longest_edge": 1024},
                tile=512,
            ),
        ),
        "llava-next": (
            VisionSpec("llava_next", clip, text_hidden, 0, feature_layer=-2),
            ImageSpec(kind="llava_next", size={"shortest_edge": 336}, crop=(336, 336)),
        ),
    }


def random_text_gguf(folder: Path, shape: str) -> Path:
    """A Llama-shaped GGUF with random Q4_0 matrices (values of about 0.02) and the default
    model's tokenizer, written as llama.cpp's converter lays one out."""
    import gguf

    hidden, layers, heads, kv_heads, ffn = TEXT_SHAPES[shape]
    source = gguf.GGUFReader(str(load_model(None).source))
    path = folder / f"random-{shape}-q4_0.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    vocab = 0
    for name, field in source.fields.items():
        if name.startswith("tokenizer."):
            value = field.contents()
            if name == "tokenizer.ggml.tokens":
                vocab = len(value)
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, value, field.types[0], sub_type=sub)
    writer.add_name(f"random {shape}")
    writer.add_context_length(8192)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    rng = np.random.default_rng(0)

    def q4_0(rows: int, cols: int) -> np.ndarray:
        raw = rng.integers(0, 256, size=(rows * cols // 32, 18), dtype=np.uint8)
        d = np.full(len(raw), 0.02 / 4.6, dtype="<f2")  # (q - 8) * d has a std of about 0.02
        raw[:, :2] = d.view(np.uint8).reshape(-1, 2)
        return raw.reshape(rows, cols // 32 * 18)

    def add(name: str, data: np.ndarray) -> None:
        kind = gguf.GGMLQuantizationType.F32 if data.dtype == np.float32 else None
        writer.add_tensor(name, data, raw_dtype=kind or gguf.GGMLQuantizationType.Q4_0)

    head_dim, ones = hidden // heads, np.ones(hidden, dtype=np.float32)
    add("token_embd.weight", q4_0(vocab, hidden))
    add("output_norm.weight", ones)
    add("output.weight", q4_0(vocab, hidden))
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", ones)
        add(f"blk.{i}.ffn_norm.weight", ones)
        add(f"blk.{i}.attn_q.weight", q4_0(hidden, hidden))
        add(f"blk.{i}.attn_k.weight", q4_0(kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_v.weight", q4_0(kv_heads * head_dim, hidden))
        add(f"blk.{i}.attn_output.weight", q4_0(hidden, hidden))
        add(f"blk.{i}.ffn_gate.weight", q4_0(ffn, hidden))
        add(f"blk.{i}.ffn_up.weight", q4_0(ffn, hidden))
        add(f"blk.{i}.ffn_down.weight", q4_0(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_image(w: int, h: int) -> Image.Image:
    """A scene-like picture: a sky gradient, a bright object off centre, texture below."""
    y, x = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    img = np.stack([40 + 80 * y, 90 + 100 * y, 200 - 60 * y], axis=-1)
    obj = ((x - 0.7) ** 2 + (y - 0.35) ** 2) < 0.02
    img[obj] = (230, 60, 40)
    rng = np.random.default_rng(0)
    img[y > 0.75] = rng.integers(40, 120, size=(int((y > 0.75).sum()), 3))
    return Image.fromarray(img.astype(np.uint8))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakRss:
    """Resident-set high-water mark while the block runs (sampled every 5 ms)."""

    def __enter__(self) -> PeakRss:
        self.peak, self.stop = rss_bytes(), False
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.005)

    def __exit__(self, *exc) -> None:
        self.stop = True
        self.thread.join()


def kv_bytes(runner: Runner, tokens: int) -> int:
    cfg = runner.backend.config
    group = runner.backend.kv_group_size
    per_value = runner.backend.kv_bits / 8 + 4 / group  # float16 scale and bias per group
    return int(tokens * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * per_value)


def run_one(vision, spec, image, runner, before, after, method, rate, n_decode) -> dict:
    with PeakRss() as mem:
        t0 = time.perf_counter()
        px = preprocess(image, spec)
        t1 = time.perf_counter()
        enc = vision.encode(px, method, Budget(rate, 0.5))
        t2 = time.perf_counter()
        cache = runner.new_cache()
        logits = runner.prefill_segments([before, enc.embeds.numpy(), after], cache)
        t3 = time.perf_counter()
        token = int(np.argmax(logits))
        for _ in range(n_decode):
            token = int(np.argmax(runner.step(token, cache)))
        t4 = time.perf_counter()
    prompt = len(before) + enc.embeds.shape[0] + len(after)
    return {
        "image_tokens": int(enc.embeds.shape[0]),
        "image_tokens_full": enc.total,
        "skipped_views": enc.skipped,
        "views": int(px.values.shape[0]),
        "vision_ms": (t2 - t1) * 1e3,
        "prefill_ms": (t3 - t2) * 1e3,
        "ttft_ms": (t3 - t0) * 1e3,
        "decode_tok_s": n_decode / (t4 - t3),
        "peak_rss_mb": mem.peak / 2**20,
        "prompt_tokens": prompt,
        "kv_bytes": kv_bytes(runner, prompt),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["smolvlm", "llava-next", "both"], default="both")
    ap.add_argument("--image", default="1024x768", help="WIDTHxHEIGHT of the test image")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--vision-layers", type=int, default=None, help="fewer layers: a quick run")
    ap.add_argument("--json", type=Path, default=None, help="also save the figures here")
    ap.add_argument(
        "--text-model",
        choices=["default", *TEXT_SHAPES],
        default="default",
        help="the default model's real weights, or a random Llama shape",
    )
    args = ap.parse_args()
    w, h = (int(v) for v in args.image.split("x"))
    image = test_image(w, h)
    torch.manual_seed(0)
    if args.text_model == "default":
        model, text_name = load_model(None), "SmolLM2-135M Q4_1"
    else:
        print(f"writing a random {args.text_model} GGUF...", file=sys.stderr, flush=True)
        folder = temporary_dir("edge-infer-vision-")
        model = load_model(random_text_gguf(folder, args.text_model))
        text_name = f"{args.text_model} shape, random Q4_0"
    runner = Runner(create_backend(model, "torch"), model.tokenizer, model.config.context_length)
    tok = model.tokenizer
    before = np.array(tok.encode("<|im_start|>user\n"), dtype=np.int64)
    after = np.array(
        tok.encode("What is in the picture?<|im_end|>\n<|im_start|>assistant\n", add_bos=False),
        dtype=np.int64,
    )
    results = {}
    names = ["smolvlm", "llava-next"] if args.shape == "both" else [args.shape]
    for name in names:
        vspec, ispec = shapes(model.config.hidden_size, args.vision_layers)[name]
        vision = VisionModel(vspec).eval().requires_grad_(False)
        run_one(vision, ispec, image, runner, before, after, "hired", 0.1, 1)  # warm-up
        rows, full = [], None
        for label, method, rate in METHODS:
            r = run_one(
                vision, ispec, image, runner, before, after, method, rate, args.decode_tokens
            )
            full = full or r
            results[f"{name}/{label}"] = r
            print(f"{name} {label}: {r}", file=sys.stderr, flush=True)  # progress of a long run
            rows.append(
                [
                    label,
                    f"{r['image_tokens']}/{r['image_tokens_full']}",
                    f"{r['views'] - r['skipped_views']}/{r['views']}",
                    f"{r['vision_ms']:.0f}",
                    f"{r['prefill_ms']:.0f}",
                    f"{r['ttft_ms']:.0f} ({full['ttft_ms'] / r['ttft_ms']:.1f}x)",
                    f"{r['decode_tok_s']:.1f}",
                    f"{r['peak_rss_mb']:.0f}",
                    f"{r['kv_bytes'] / 2**20:.2f} ({full['kv_bytes'] / r['kv_bytes']:.1f}x)",
                ]
            )
        layers = vspec.tower.layers
        print_table(
            f"{name}: {w}x{h} image, vision tower random ({layers} layers), "
            f"text {text_name} (torch/{runner.backend.device}); {machine()}",
            [
                "method",
                "image tokens",
                "views run",
                "vision ms",
                "prefill ms",
                "TTFT ms",
                "decode tok/s",
                "peak RSS MB",
                "KV MiB",
            ],
            rows,
        )
    write_results(args.json, results)


if __name__ == "__main__":
    main()
