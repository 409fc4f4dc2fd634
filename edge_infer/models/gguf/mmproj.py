"""Read llama.cpp's mmproj GGUF (a CLIP or SigLIP tower and its projector) as a Hugging Face
VLM's config and weight names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_infer.errors import ModelFormatError, UnsupportedModelError
from edge_infer.models.gguf.quants import UnsupportedTensorType, dequantize
from edge_infer.models.gguf.reader import GGUFFile

PROJECTORS = ("mlp", "idefics3")
MERGE_TYPES = ("flat", "spatial_unpad")  # LLaVA-1.5's one view; LLaVA-NeXT's unpadded tiles
_MODEL_TYPE = {"mlp": "llava", "idefics3": "idefics3"}
_TOWER = {"mlp": "vision_tower.vision_model.", "idefics3": "model.vision_model."}
_GLOBAL_NAMES = {
    "v.class_embd": "embeddings.class_embedding",
    "v.patch_embd.weight": "embeddings.patch_embedding.weight",
    "v.patch_embd.bias": "embeddings.patch_embedding.bias",
    "v.position_embd.weight": "embeddings.position_embedding.weight",
    "v.pre_ln.weight": "pre_layrnorm.weight",
    "v.pre_ln.bias": "pre_layrnorm.bias",
    "v.post_ln.weight": "post_layernorm.weight",
    "v.post_ln.bias": "post_layernorm.bias",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
_PROJECTOR_NAMES = {
    "mm.0.weight": "multi_modal_projector.linear_1.weight",
    "mm.0.bias": "multi_modal_projector.linear_1.bias",
    "mm.2.weight": "multi_modal_projector.linear_2.weight",
    "mm.2.bias": "multi_modal_projector.linear_2.bias",
    "mm.model.fc.weight": "connector.modality_projection.proj.weight",
    # LLaVA-NeXT's row-end embedding: the legacy converter's name, then clip.cpp's newer one
    "model.image_newline": "image_newline",
    "v.image_newline": "image_newline",
}
_BLOCK = re.compile(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class Mmproj:
    """An mmproj file as a VLM directory would describe it.

    ``config`` is shaped like a transformers VLM config.json (``model_type``, ``vision_config``,
    ``text_config.hidden_size``, ...) listing only the encoder layers the projector reads;
    ``tensors`` float32 arrays under transformers 4.x names; ``ffn_swapped`` says the file was
    an old export whose FFN up/down names were swapped (and were put right here). A LLaVA-NeXT
    file (merge type ``spatial_unpad``) reads as ``model_type`` ``llava_next`` with its
    ``image_grid_pinpoints`` as (height, width) pairs, as transformers lists them.
    """

    path: Path
    projector: str
    config: dict[str, Any]
    tensors: dict[str, np.ndarray]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    ffn_swapped: bool


def _key(meta: dict[str, Any], key: str, path: Path, default: Any = None) -> Any:
    if key in meta:
        return meta[key]
    if default is None:
        raise ModelFormatError(f"{path}: mmproj metadata lacks {key}")
    return default


def _float(gguf: GGUFFile, name: str) -> np.ndarray:
    info = gguf.tensors[name]
    try:
        return dequantize(gguf.raw(name), info.ggml_type, info.shape).astype(np.float32)
    except UnsupportedTensorType as exc:
        raise UnsupportedModelError(f"{gguf.path}: tensor {name!r}: {exc}") from None


def layers_read(meta: dict[str, Any], projector: str, block_count: int, path: Path) -> int:
    """Encoder layers the projector's input comes from, as llama.cpp counts them: a LLaVA MLP
    reads the output of the last layer but one (old exports hold only those layers' tensors),
    unless ``clip.vision.feature_layer`` names the layer."""
    layers = meta.get("clip.vision.feature_layer")
    if layers is not None:
        picked = layers if isinstance(layers, list) else [layers]
        if len(picked) != 1:
            raise UnsupportedModelError(
                f"{path}: clip.vision.feature_layer {picked}: only one feature layer is supported"
            )
        return int(picked[0])
    return block_count - 1 if projector == "mlp" else block_count


def read_mmproj(path: str | Path) -> Mmproj:
    """The tower and projector of an mmproj GGUF (projector types ``mlp`` and ``idefics3``)."""
    gguf = GGUFFile(path)
    path, meta = gguf.path, gguf.metadata
    if not meta.get("clip.has_vision_encoder", True):
        raise UnsupportedModelError(f"{path}: this mmproj has no vision encoder")
    projector = str(meta.get("clip.projector_type", "mlp"))
    if projector not in PROJECTORS:
        raise UnsupportedModelError(
            f"{path}: clip.projector_type {projector!r} is not supported "
            f"(supported: {', '.join(PROJECTORS)})"
        )
    hidden = int(_key(meta, "clip.vision.embedding_length", path))
    blocks = int(_key(meta, "clip.vision.block_count", path))
    ff = int(_key(meta, "clip.vision.feed_forward_length", path))
    n_run = layers_read(meta, projector, blocks, path)
    tower = _TOWER[projector]
    tensors: dict[str, np.ndarray] = {}
    swapped = False
    for name in gguf.tensors:
        m = _BLOCK.fullmatch(name)
        if m:
            layer, part, kind = int(m[1]), m[2], m[3]
            if layer >= n_run or part not in _BLOCK_NAMES:
                continue
            if part in ("ffn_up", "ffn_down") and ff != hidden:
                # old exports name fc1 (hidden -> ff) ffn_down; its input width tells them apart
                down = gguf.tensors[f"v.blk.{layer}.ffn_down.weight"].shape
                if down[-1] == hidden:
                    part = "ffn_down" if part == "ffn_up" else "ffn_up"
                    swapped = True
            hf = f"{tower}encoder.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"
        elif name in _GLOBAL_NAMES:
            hf = tower + _GLOBAL_NAMES[name]
        elif name in _PROJECTOR_NAMES:
            hf = _PROJECTOR_NAMES[name]
        else:
            continue
        tensors[hf] = _float(gguf, name)
    if projector == "mlp" and "v.post_ln.weight" in gguf.tensors:
        raise UnsupportedModelError(
            f"{path}: a LLaVA projector after the tower's post-norm is not supported"
        )
    out_name = "mm.2.weight" if projector == "mlp" else "mm.model.fc.weight"
    if out_name not in gguf.tensors:
        raise ModelFormatError(f"{path}: mmproj lacks tensor {out_name}")
    size = int(_key(meta, "clip.vision.image_size", path))
    vision = {
        "hidden_size": hidden,
        "num_attention_heads": int(_key(meta, "clip.vision.attention.head_count", path)),
        "num_hidden_layers": n_run,
        "intermediate_size": ff,
        "patch_size": int(_key(meta, "clip.vision.patch_size", path)),
        "image_size": size,
        # stored as float32: 1e-5 reads back as 9.99999975e-06
        "layer_norm_eps": float(
            f"{float(_key(meta, 'clip.vision.attention.layer_norm_epsilon', path)):.7g}"
        ),
        "hidden_act": _activation(meta, projector),
    }
    config: dict[str, Any] = {
        "model_type": _MODEL_TYPE[projector],
        "vision_config": vision,
        "text_config": {"hidden_size": gguf.tensors[out_name].shape[0]},
    }
    if projector == "mlp":
        config |= {"vision_feature_layer": -1, "image_token_index": -1}
        pinpoints = anyres_pinpoints(meta, path)
        if pinpoints:
            if "image_newline" not in tensors:
                raise ModelFormatError(
                    f"{path}: spatial_unpad mmproj lacks tensor model.image_newline"
                )
            config |= {"model_type": "llava_next", "image_grid_pinpoints": pinpoints}
    else:
        scale = int(meta.get("clip.vision.projector.scale_factor", 2))
        config |= {"scale_factor": scale, "image_token_id": -1}
    return Mmproj(
        path=path,
        projector=projector,
        config=config,
        tensors=tensors,
        image_mean=tuple(float(x) for x in meta.get("clip.vision.image_mean", (0.5,) * 3)),
        image_std=tuple(float(x) for x in meta.get("clip.vision.image_std", (0.5,) * 3)),
        ffn_swapped=swapped,
    )


def anyres_pinpoints(meta: dict[str, Any], path: Path) -> list[list[int]]:
    """LLaVA-NeXT's tile canvases as [height, width] pairs, or [] for one view (LLaVA-1.5).

    llama.cpp keeps ``clip.vision.image_grid_pinpoints`` flat and reads each pair as (width,
    height); ``clip.vision.mm_patch_merge_type`` says how the tiles' tokens are laid out, and
    only ``spatial_unpad`` (unpadded rows, each ended by ``image_newline``) is LLaVA-NeXT's.
    ``clip.vision.image_crop_resolution`` is not read: the tiles are the tower's image size."""
    merge = meta.get("clip.vision.mm_patch_merge_type", "flat")
    if merge not in MERGE_TYPES:
        raise UnsupportedModelError(
            f"{path}: clip.vision.mm_patch_merge_type {merge!r} is not supported "
            f"(supported: {', '.join(MERGE_TYPES)})"
        )
    flat = meta.get("clip.vision.image_grid_pinpoints") or []
    if (
        not isinstance(flat, list)
        or len(flat) % 2
        or not all(isinstance(v, int) and v > 0 for v in flat)
    ):
        raise ModelFormatError(
            f"{path}: clip.vision.image_grid_pinpoints must be width, height pairs of "
            f"positive integers, got {flat!r}"
        )
    if merge == "flat":
        if flat:
            raise UnsupportedModelError(
                f"{path}: clip.vision.mm_patch_merge_type 'flat' with image_grid_pinpoints "
                "(tiles without unpadding) is not supported"
            )
        return []
    if not flat:
        raise ModelFormatError(
            f"{path}: clip.vision.mm_patch_merge_type 'spatial_unpad' needs "
            "clip.vision.image_grid_pinpoints"
        )
    return [[int(h), int(w)] for w, h in zip(flat[::2], flat[1::2], strict=True)]


def _activation(meta: dict[str, Any], projector: str) -> str:
    """The tower's FFN activation as transformers names it (llama.cpp: quick GELU unless
    ``clip.use_gelu`` or ``clip.use_silu``; its GELU is the tanh form SigLIP uses)."""
    if meta.get("clip.use_silu"):
        return "silu"
    if meta.get("clip.use_gelu"):
        return "gelu_pytorch_tanh" if projector == "idefics3" else "gelu"
    return "quick_gelu"
