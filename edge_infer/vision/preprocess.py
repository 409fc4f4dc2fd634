"""Image preprocessing for the vision towers (numpy + Pillow), as the models were trained."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
LLAVA_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
MAX_IMAGE_SIDE = 4096  # Idefics3's cap on a resized image's longest edge

KINDS = ("clip", "llava_next", "idefics3")
_KIND_OF_TYPE = {
    "CLIPImageProcessor": "clip",
    "LlavaImageProcessor": "clip",
    "SiglipImageProcessor": "clip",
    "LlavaNextImageProcessor": "llava_next",
    "Idefics3ImageProcessor": "idefics3",
    "SmolVLMImageProcessor": "idefics3",
}


@dataclass(frozen=True)
class ImageSpec:
    """One model's preprocessing: which pipeline, its filter, sizes and normalisation."""

    kind: str = "clip"
    resample: int = Image.Resampling.BICUBIC
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_pad: bool = False  # LLaVA-1.5's pad-to-square with the mean colour (clip kind only)
    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 336})
    crop: tuple[int, int] = (336, 336)
    pinpoints: tuple[tuple[int, int], ...] = LLAVA_NEXT_PINPOINTS
    tile: int = 364  # Idefics3: a tile's side (max_image_size.longest_edge)
    split: bool = True  # Idefics3: cut into tiles plus a global image

    @classmethod
    def from_config(cls, raw: dict[str, Any], where: str = "preprocessor_config.json") -> ImageSpec:
        """Read a Hugging Face ``preprocessor_config.json`` (transformers 4.x or 5.x)."""
        name = str(raw.get("image_processor_type", "CLIPImageProcessor"))
        for suffix in ("Pil", "Fast"):
            name = name.removesuffix(suffix)
        if name not in _KIND_OF_TYPE:
            raise ValueError(f"{where}: unsupported image_processor_type {name!r}")
        kind = _KIND_OF_TYPE[name]
        half = kind == "idefics3" or name == "SiglipImageProcessor"
        size = raw.get("size", {"longest_edge": 4 * 364} if kind == "idefics3" else None)
        if size is None:
            size = {"shortest_edge": 224}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = raw.get("crop_size") or {"height": 224, "width": 224}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        default_resample = Image.Resampling.LANCZOS if kind == "idefics3" else Image.BICUBIC
        return cls(
            kind=kind,
            resample=int(raw.get("resample", default_resample)),
            mean=tuple(raw.get("image_mean", HALF if half else OPENAI_CLIP_MEAN)),
            std=tuple(raw.get("image_std", HALF if half else OPENAI_CLIP_STD)),
            rescale=float(raw.get("rescale_factor", 1 / 255)),
            do_resize=bool(raw.get("do_resize", True)),
            do_center_crop=bool(raw.get("do_center_crop", kind != "idefics3")),
            do_rescale=bool(raw.get("do_rescale", True)),
            do_normalize=bool(raw.get("do_normalize", True)),
            do_pad=bool(raw.get("do_pad", False)) and kind == "clip",
            size=dict(size),
            crop=(int(crop["height"]), int(crop["width"])),
            pinpoints=tuple(
                tuple(int(v) for v in p)
                for p in raw.get("image_grid_pinpoints", LLAVA_NEXT_PINPOINTS)
            ),
            tile=int(raw.get("max_image_size", {"longest_edge": 364})["longest_edge"]),
            split=bool(raw.get("do_image_splitting", True)),
        )

    @classmethod
    def from_dir(cls, path: Path) -> ImageSpec:
        f = Path(path) / "preprocessor_config.json"
        try:
            raw = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: cannot read the image preprocessing settings ({e})") from e
        return cls.from_config(raw, str(f))


@dataclass(frozen=True)
class Pixels:
    """A preprocessed image: partitions [P, 3, H, W] float32 and how they tile the image.

    ``grid`` is (rows, cols) of tiles, (0, 0) for a single view; ``base`` is the index of the
    whole-image view (LLaVA-NeXT puts it first, Idefics3 last).
    """

    values: np.ndarray
    image_hw: tuple[int, int]
    grid: tuple[int, int]
    base: int
    canvas_hw: tuple[int, int] | None = None  # LLaVA-NeXT: the chosen best resolution


def open_image(src: str | Path | bytes | Image.Image) -> Image.Image:
    """An image upright (EXIF orientation applied) in RGB; transparency is laid on white."""
    if isinstance(src, Image.Image):
        img = src
    else:
        try:
            img = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
            img.load()
        except (OSError, ValueError) as e:
            where = "image bytes" if isinstance(src, bytes) else str(src)
            raise ValueError(f"{where}: not a readable image ({e})") from e
    img = ImageOps.exif_transpose(img)
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def to_chw(img: Image.Image) -> np.ndarray:
    return np.moveaxis(np.asarray(img, dtype=np.uint8), -1, 0)


def resize(chw: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    """Resize a uint8 CHW array with Pillow (same size: unchanged)."""
    if tuple(chw.shape[-2:]) == tuple(hw):
        return chw
    img = Image.fromarray(np.ascontiguousarray(np.moveaxis(chw, 0, -1)))
    return to_chw(img.resize((hw[1], hw[0]), resample=resample))


def shortest_edge_size(hw: tuple[int, int], edge: int) -> tuple[int, int]:
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(edge * long / short)
    return (new_long, edge) if w <= h else (edge, new_long)


def center_crop(chw: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Crop the centre, zero-padding first where the image is smaller."""
    h, w = chw.shape[-2:]
    ch, cw = hw
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return chw[:, top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    out = np.zeros((chw.shape[0], nh, nw), dtype=chw.dtype)
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    out[:, tp : tp + h, lp : lp + w] = chw
    top, left = top + tp, left + lp
    return out[:, max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def pad_to_square(chw: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
    c, h, w = chw.shape
    if h == w:
        return chw
    side = max(h, w)
    out = np.empty((c, side, side), dtype=chw.dtype)
    out[:] = np.asarray(color, dtype=chw.dtype)[:, None, None]
    if w > h:
        out[:, (side - h) // 2 : (side - h) // 2 + h, :] = chw
    else:
        out[:, :, (side - w) // 2 : (side - w) // 2 + w] = chw
    return out


def normalize(chw: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """uint8 -> float32: rescale in float64 then normalise in float32, as transformers does."""
    x = chw.astype(np.float64) * spec.rescale if spec.do_rescale else chw
    x = x.astype(np.float32)
    if spec.do_normalize:
        mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return x


def clip_view(chw: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """CLIP's single view: shortest edge to size, centre crop (LLaVA-1.5: padded square first)."""
    if spec.do_pad:
        chw = pad_to_square(chw, tuple(int(m * 255) for m in spec.mean))
    if spec.do_resize:
        if "shortest_edge" in spec.size:
            chw = resize(
                chw, shortest_edge_size(chw.shape[-2:], spec.size["shortest_edge"]), spec.resample
            )
        else:
            chw = resize(chw, (spec.size["height"], spec.size["width"]), spec.resample)
    if spec.do_center_crop:
        chw = center_crop(chw, spec.crop)
    return chw


def best_resolution(hw: tuple[int, int], pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's choice: the pinpoint keeping the most pixels, then wasting the fewest."""
    h, w = hw
    best, best_eff, best_waste = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ph, pw), eff, waste
    assert best is not None
    return best


def fit_size(hw: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Size of ``hw`` scaled to fit ``target`` keeping its aspect (LLaVA-NeXT's rounding)."""
    h, w = hw
    th, tw = target
    sw, sh = tw / w, th / h
    if sw < sh:
        return min(math.ceil(h * sw), th), tw
    return th, min(math.ceil(w * sh), tw)


def llava_next_views(chw: np.ndarray, spec: ImageSpec) -> tuple[list[np.ndarray], tuple, tuple]:
    hw = tuple(chw.shape[-2:])
    canvas = best_resolution(hw, spec.pinpoints)
    new_h, new_w = fit_size(hw, canvas)
    scaled = resize(chw, (new_h, new_w), spec.resample)
    py, ry = divmod(canvas[0] - new_h, 2)
    px, rx = divmod(canvas[1] - new_w, 2)
    padded = np.pad(scaled, ((0, 0), (py, py + ry), (px, px + rx)))
    side = spec.crop[0]
    edge = spec.size.get("shortest_edge", spec.size.get("height"))
    tiles = [
        padded[:, i : i + side, j : j + side]
        for i in range(0, canvas[0], side)
        for j in range(0, canvas[1], side)
    ]
    base = resize(chw, (edge, edge), spec.resample)
    grid = (math.ceil(canvas[0] / side), math.ceil(canvas[1] / side))
    return [clip_view(v, spec) for v in [base, *tiles]], grid, canvas


def idefics3_longest_edge(hw: tuple[int, int], longest: int) -> tuple[int, int]:
    h, w = hw
    aspect = w / h
    if w >= h:
        w = longest
        h = int(w / aspect)
        h += h % 2
    else:
        h = longest
        w = int(h * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > MAX_IMAGE_SIDE:
        w, h = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE / aspect)
    elif h > w and h > MAX_IMAGE_SIDE:
        h, w = MAX_IMAGE_SIDE, int(MAX_IMAGE_SIDE * aspect)
    return max(h, 1), max(w, 1)


def idefics3_tile_multiple(hw: tuple[int, int], tile: int) -> tuple[int, int]:
    h, w = hw
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return h, w


def idefics3_views(chw: np.ndarray, spec: ImageSpec) -> tuple[list[np.ndarray], tuple]:
    if spec.do_resize:
        chw = resize(
            chw, idefics3_longest_edge(chw.shape[-2:], spec.size["longest_edge"]), spec.resample
        )
    t = spec.tile
    if not spec.split:
        return [resize(chw, (t, t), spec.resample)], (0, 0)
    chw = resize(chw, idefics3_tile_multiple(chw.shape[-2:], t), spec.resample)
    h, w = chw.shape[-2:]
    if h <= t and w <= t:
        return [chw], (0, 0)
    rows, cols = (h - t) // t + 1, (w - t) // t + 1
    views = [
        chw[:, r * t : (r + 1) * t, c * t : (c + 1) * t] for r in range(rows) for c in range(cols)
    ]
    return [*views, resize(chw, (t, t), spec.resample)], (rows, cols)


def preprocess(src: str | Path | bytes | Image.Image, spec: ImageSpec) -> Pixels:
    """Open (EXIF, RGB) and preprocess one image into the model's partitions."""
    chw = to_chw(open_image(src))
    hw = (int(chw.shape[1]), int(chw.shape[2]))
    canvas = None
    if spec.kind == "clip":
        views, grid, base = [clip_view(chw, spec)], (0, 0), 0
    elif spec.kind == "llava_next":
        views, grid, canvas = llava_next_views(chw, spec)
        base = 0
    elif spec.kind == "idefics3":
        views, grid = idefics3_views(chw, spec)
        base = len(views) - 1
    else:
        raise ValueError(f"unknown image preprocessing kind {spec.kind!r}; expected one of {KINDS}")
    values = np.stack([normalize(v, spec) for v in views])
    return Pixels(values, hw, grid, base, canvas)


def llava_next_token_count(
    image_hw: tuple[int, int], canvas_hw: tuple[int, int], side: int, patch: int
) -> tuple[int, int, int]:
    """LLaVA-NeXT's image tokens without dropping: (base, unpadded tiles, newlines)."""
    per = side // patch
    cur_h, cur_w = per * (canvas_hw[0] // side), per * (canvas_hw[1] // side)
    h, w = image_hw
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(w * (cur_h / h), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    return per * per, cur_h * cur_w, cur_h


def image_token_count(pixels: Pixels, spec: ImageSpec, patch: int, merge: int = 1) -> int:
    """Image tokens the language model sees without dropping.

    ``patch``: the vision tower's patch size; ``merge``: pixel shuffle's factor (Idefics3).
    """
    side = pixels.values.shape[-1]
    if spec.kind == "llava_next" and pixels.canvas_hw is not None:
        return sum(llava_next_token_count(pixels.image_hw, pixels.canvas_hw, side, patch))
    per = (side // patch) ** 2 // (merge * merge)
    return per * pixels.values.shape[0]
