"""Prompts with images for agents and the engine: image parts, ids, prefill segments, keys."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_infer.generation.tools import Tool

ImageSource = str | Path | bytes | Any  # a path, encoded bytes or a PIL image


def image_parts(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The image parts of a message's content (OpenAI ``image_url`` or ``image``)."""
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [p for p in content if isinstance(p, dict) and p.get("type") in ("image_url", "image")]


def image_source(part: dict[str, Any]) -> ImageSource:
    """What an image part points at: bytes of a data: URI, a path, or a PIL image."""
    if part["type"] == "image":
        return part["image"]
    url = part["image_url"]
    url = url["url"] if isinstance(url, dict) else url
    if url.startswith("data:"):
        return base64.b64decode(url.partition(",")[2])
    return Path(url.removeprefix("file://"))


class ImagePrompt:
    """A prompt with images: ids per position, prefill segments, (start, end, key) per image.

    Placeholder ids are the same for every image, so the KV of a span is reused only where
    the cached span has the same key (pixels and dropping settings).
    """

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.segments: list[np.ndarray] = []
        self.images: list[tuple[int, int, str]] = []
        self.image_tokens = 0
        self.image_tokens_total = 0

    def add_ids(self, ids: list[int]) -> None:
        if not ids:
            return
        self.ids += ids
        if self.segments and self.segments[-1].ndim == 1:
            self.segments[-1] = np.concatenate([self.segments[-1], np.asarray(ids)])
        else:
            self.segments.append(np.asarray(ids, dtype=np.int64))

    def add_embeds(self, embeds: np.ndarray, image_id: int) -> None:
        self.ids += [image_id] * len(embeds)
        self.segments.append(embeds)

    def segments_before_last(self) -> list[np.ndarray]:
        """The segments without the prompt's last token (which the generation prefills)."""
        return self.segments_from(0)

    def segments_from(self, start: int) -> list[np.ndarray]:
        """The segments covering positions ``start`` .. the last but one (the generation
        prefills the last token itself)."""
        out, pos, end = [], 0, len(self.ids) - 1
        for seg in self.segments:
            lo, hi = max(start, pos), min(end, pos + len(seg))
            if lo < hi:
                out.append(seg[lo - pos : hi - pos])
            pos += len(seg)
        if self.segments[-1].ndim != 1:
            raise ValueError("the prompt ends in an image: add text after it")
        return out

    def reusable(self, cached: list[list[Any]], keep: int) -> int:
        """``keep`` (a shared token prefix) cut back to the start of the first cached image
        span that this prompt does not hold with the same key."""
        mine = {(s, e, k) for s, e, k in self.images}
        for s, e, k in cached:
            if s < keep and (s, e, k) not in mine:
                keep = s
        for s, e, _ in self.images:  # a span only partly held is run again whole
            if s < keep < e:
                keep = s
        return keep


# renders a conversation with images (and its tools) as one prompt
ImageRender = Callable[[list[dict[str, Any]], Sequence[Tool]], ImagePrompt]


def storable(src: ImageSource) -> dict[str, Any]:
    """An image part holding ``src`` as a data: URI, so a conversation with it can be saved."""
    if isinstance(src, (str, Path)):
        data = Path(src).read_bytes()
    elif isinstance(src, bytes):
        data = src
    else:
        buf = io.BytesIO()
        src.save(buf, format="PNG")
        data = buf.getvalue()
    uri = "data:image;base64," + base64.b64encode(data).decode()
    return {"type": "image_url", "image_url": {"url": uri}}
