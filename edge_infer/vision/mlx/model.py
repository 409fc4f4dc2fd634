"""A VLM's tower and projector in MLX, with HiRED's attention scores, from the same files as
the torch ones (Hugging Face directory or llama.cpp mmproj)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from edge_infer.models.gguf.mmproj import read_mmproj
from edge_infer.vision import dropping
from edge_infer.vision import plan as vision_plan
from edge_infer.vision.dropping import Budget
from edge_infer.vision.preprocess import Pixels
from edge_infer.vision.spec import TowerSpec, VisionSpec, channels_last_patch_kernel, vision_key

QUERY_CHUNK = 256  # queries per softmax block when scoring received attention


def activation(name: str, x: mx.array) -> mx.array:
    if name == "quick_gelu":
        return x * mx.sigmoid(1.702 * x)
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return 0.5 * x * (1 + mx.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if name == "gelu":
        return 0.5 * x * (1 + mx.erf(x / math.sqrt(2)))
    raise ValueError(f"unsupported activation {name!r} in the vision config")


def siglip_positions(g: int, gh: int, gw: int) -> np.ndarray:
    """SigLIP's (Idefics3's) bucketed position ids for a gh x gw patch grid of a g x g table."""
    if (gh, gw) == (g, g):
        return np.arange(g * g)
    bounds = np.arange(1 / g, 1.0, 1 / g, dtype=np.float32)
    fh = np.minimum(np.arange(gh, dtype=np.float32) / gh, np.float32(1 - 1e-6))
    fw = np.minimum(np.arange(gw, dtype=np.float32) / gw, np.float32(1 - 1e-6))
    bh = np.searchsorted(bounds, fh, side="right")
    bw = np.searchsorted(bounds, fw, side="right")
    return (bh[:, None] * g + bw[None, :]).reshape(-1)


class VisionModel:
    """Tower + projector of a LLaVA-1.5, LLaVA-NeXT or Idefics3/SmolVLM model in MLX.

    ``w`` holds the weights under our keys (``tower.*``, ``projector.*``, ``newline``).
    """

    def __init__(self, spec: VisionSpec, w: dict[str, mx.array]):
        self.spec, self.w = spec, w

    @classmethod
    def load(cls, path: Path, dtype: mx.Dtype = mx.float32) -> VisionModel:
        """From a Hugging Face directory (either transformers layout) or an mmproj ``.gguf``."""
        path = Path(path)
        if path.suffix == ".gguf":
            mm = read_mmproj(path)
            spec = VisionSpec.from_config(mm.config, str(path))
            tensors = {k: mx.array(v) for k, v in mm.tensors.items()}
        else:
            spec = VisionSpec.from_dir(path)
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise ValueError(f"{path}: no .safetensors weights")
            tensors = {}
            for f in files:
                tensors.update(
                    {k: v for k, v in mx.load(str(f)).items() if vision_key(k) is not None}
                )
        w = {}
        for name, v in tensors.items():
            key = vision_key(name)
            w[key] = (
                v.transpose(0, 3, 1, 2) if channels_last_patch_kernel(key, v.shape) else v
            ).astype(dtype)
        missing = [k for k in required_keys(spec) if k not in w]
        if missing:
            raise ValueError(f"{path}: vision weights missing, e.g. {missing[0]}")
        return cls(spec, {k: w[k] for k in required_keys(spec)})

    # ------------------------------------------------------------------ tower

    def linear(self, name: str, x: mx.array) -> mx.array:
        y = x @ self.w[f"{name}.weight"].T
        bias = self.w.get(f"{name}.bias")
        return y + bias if bias is not None else y

    def norm(self, name: str, x: mx.array) -> mx.array:
        t = self.spec.tower
        return mx.fast.layer_norm(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"], t.eps)

    def embed(self, pixels: mx.array) -> mx.array:
        t = self.spec.tower
        b, c, h, wd = pixels.shape
        gh, gw, p = h // t.patch, wd // t.patch, t.patch
        patches = pixels.reshape(b, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5)
        kernel = self.w["tower.embeddings.patch_embedding.weight"].reshape(t.hidden, -1)
        x = patches.reshape(b, gh * gw, c * p * p) @ kernel.T
        pos = self.w["tower.embeddings.position_embedding.weight"]
        if t.has_cls:
            if (gh, gw) != (t.grid, t.grid):
                raise ValueError(f"CLIP tower takes {t.image_size}px views, got {pixels.shape}")
            cls = mx.broadcast_to(self.w["tower.embeddings.class_embedding"], (b, 1, t.hidden))
            return mx.concatenate([cls, x], axis=1) + pos
        x = x + self.w["tower.embeddings.patch_embedding.bias"]
        return x + pos[mx.array(siglip_positions(t.grid, gh, gw))]

    def block(self, i: int, x: mx.array, score: str | None) -> tuple[mx.array, mx.array | None]:
        t: TowerSpec = self.spec.tower
        pre = f"tower.encoder.layers.{i}"
        h = self.norm(f"{pre}.layer_norm1", x)
        b, s, _ = h.shape
        d = t.hidden // t.heads
        scale = d**-0.5

        def split(name: str) -> mx.array:
            return (
                self.linear(f"{pre}.self_attn.{name}", h)
                .reshape(b, s, t.heads, d)
                .transpose(0, 2, 1, 3)
            )

        q, k, v = split("q_proj"), split("k_proj"), split("v_proj")
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
        x = x + self.linear(
            f"{pre}.self_attn.out_proj", out.transpose(0, 2, 1, 3).reshape(b, s, -1)
        )
        m = self.norm(f"{pre}.layer_norm2", x)
        m = self.linear(f"{pre}.mlp.fc2", activation(t.act, self.linear(f"{pre}.mlp.fc1", m)))
        scores = None
        if score == "cls":
            scores = cls_row(q, k, scale)
        elif score == "received":
            scores = received(q, k, scale)
        return x + m, scores

    def run(
        self, pixels: mx.array, score_layers: tuple[int, ...] = ()
    ) -> tuple[mx.array, dict[int, mx.array]]:
        """Hidden states the projector reads and per-token scores at ``score_layers``."""
        t, n = self.spec.tower, self.spec.layers_run
        x = self.embed(pixels)
        if t.has_cls:
            x = self.norm("tower.pre_layrnorm", x)
        kind = "cls" if t.has_cls else "received"
        scores: dict[int, mx.array] = {}
        for i in range(n):
            x, s = self.block(i, x, kind if i in score_layers else None)
            if s is not None:
                scores[i] = s
        if not t.has_cls and n == t.layers:
            x = self.norm("tower.post_layernorm", x)
        return x, scores

    # ------------------------------------------------------------------ projector

    def project(self, hidden: mx.array) -> mx.array:
        if self.spec.tower.has_cls:  # the CLS token never reaches the language model
            hidden = hidden[:, 1:]
        if self.spec.arch == "idefics3":
            return self.linear("projector.proj", self.shuffle(hidden))
        h = activation(self.spec.projector_act, self.linear("projector.linear_1", hidden))
        return self.linear("projector.linear_2", h)

    def shuffle(self, x: mx.array) -> mx.array:
        """Idefics3's pixel shuffle: each s x s block of patches becomes one token."""
        b, n, d = x.shape
        side, s = int(round(n**0.5)), self.spec.scale_factor
        x = x.reshape(b, side // s, s, side // s, s, d).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (side // s) ** 2, s * s * d)

    def features(self, views: mx.array) -> mx.array:
        """Projected features of every view, no dropping: [P, tokens, text_hidden]."""
        hidden, _ = self.run(views)
        return self.project(hidden)

    def scores_of(self, raw: mx.array) -> np.ndarray:
        """Per-token scores of one layer as numpy, grouped per LLM token for pixel shuffle."""
        s = np.array(raw.astype(mx.float32))
        f, g = self.spec.scale_factor, self.spec.tower.grid
        return dropping.group_scores(s, g, g, f) if f > 1 else s

    def encode(
        self,
        px: Pixels,
        method: str = "full",
        budget: Budget | None = None,
        mode: str = "spatial",
    ) -> Encoded:
        """Encode an image's views and keep the tokens ``method`` picks, in prompt order (see
        ``vision.plan``: tiles without budget never run)."""
        views = mx.array(px.values)
        dtype = self.w[
            "projector." + ("proj" if self.spec.arch == "idefics3" else "linear_2") + ".weight"
        ].dtype
        feats: dict[int, mx.array] = {}

        def run_views(idx: list[int], layers: tuple[int, ...]) -> dict[int, np.ndarray]:
            hidden, scores = self.run(views[mx.array(idx)].astype(dtype), layers)
            f = self.project(hidden)
            for j, i in enumerate(idx):
                feats[i] = f[j]
            return {k: self.scores_of(v) for k, v in scores.items()}

        p = vision_plan.plan(self.spec, px, run_views, method, budget, mode)
        n, d = self.spec.tokens_per_view, self.spec.text_hidden
        zeros = mx.zeros((n, d), dtype=dtype)  # views never run: none of their tokens is kept
        table = mx.concatenate([feats.get(i, zeros) for i in range(px.values.shape[0])])
        if self.spec.arch == "llava_next":
            table = mx.concatenate([table, self.w["newline"].astype(dtype)[None]])
        embeds = table[mx.array(p.order.astype(np.int32))]
        return Encoded(embeds, p.kept, p.total, p.skipped)


@dataclass
class Encoded:
    """An image's embeddings for the language model [kept, text_hidden] and what dropping kept
    (as ``vision.plan.Plan`` describes)."""

    embeds: mx.array
    kept: list[np.ndarray]
    total: int
    skipped: int

    def numpy_embeds(self) -> np.ndarray:
        """``embeds`` as float32 numpy."""
        return np.array(self.embeds.astype(mx.float32))


def cls_row(q: mx.array, k: mx.array, scale: float) -> mx.array:
    """The CLS query's attention on the patch tokens, heads summed: [B, S-1]."""
    row = mx.softmax(
        (q[:, :, :1].astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * scale, axis=-1
    )
    return row[:, :, 0, 1:].sum(axis=1)


def received(q: mx.array, k: mx.array, scale: float) -> mx.array:
    """Mean attention each token receives over heads and queries: [B, S], in query blocks."""
    b, h, s, _ = q.shape
    kt = k.astype(mx.float32).swapaxes(-1, -2)
    total = mx.zeros((b, s), dtype=mx.float32)
    for i in range(0, s, QUERY_CHUNK):
        probs = mx.softmax((q[:, :, i : i + QUERY_CHUNK].astype(mx.float32) @ kt) * scale, axis=-1)
        total = total + probs.sum(axis=(1, 2))
    return total / (h * s)


def required_keys(spec: VisionSpec) -> list[str]:
    """Our keys of every weight the tower (up to the layers read) and projector use."""
    t = spec.tower
    keys = ["tower.embeddings.patch_embedding.weight", "tower.embeddings.position_embedding.weight"]
    if t.has_cls:
        keys += ["tower.embeddings.class_embedding", "tower.pre_layrnorm.weight"]
        keys += ["tower.pre_layrnorm.bias"]
    else:
        keys += ["tower.embeddings.patch_embedding.bias"]
        if spec.layers_run == t.layers:
            keys += ["tower.post_layernorm.weight", "tower.post_layernorm.bias"]
    for i in range(spec.layers_run):
        pre = f"tower.encoder.layers.{i}"
        for m in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2") + tuple(
            f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")
        ):
            keys += [f"{pre}.{m}.weight", f"{pre}.{m}.bias"]
    if spec.arch == "idefics3":
        keys += ["projector.proj.weight"]
    else:
        keys += [f"projector.linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]
    if spec.arch == "llava_next":
        keys += ["newline"]
    return keys
