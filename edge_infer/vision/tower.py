"""What every framework's VLM image side offers (tower, projector, dropping), and loading the
one that runs on a backend's framework."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from edge_infer.vision.dropping import Budget
from edge_infer.vision.preprocess import Pixels
from edge_infer.vision.spec import VisionSpec

FRAMEWORKS = ("torch", "mlx")


@runtime_checkable
class EncodedImage(Protocol):
    """An image's embeddings for the language model and what dropping kept of it."""

    kept: list[np.ndarray]  # per view (in ``Pixels`` order) the kept token indices
    total: int  # the image's tokens without dropping
    skipped: int  # views whose encoder pass never ran

    def numpy_embeds(self) -> np.ndarray:
        """The embeddings as float32 numpy [kept tokens, text hidden], in prompt order."""
        ...


@runtime_checkable
class VisionTower(Protocol):
    """A VLM's vision tower and projector on one framework, from a Hugging Face directory or a
    llama.cpp mmproj file."""

    spec: VisionSpec

    @classmethod
    def load(cls, path: Path) -> VisionTower:
        """The tower and projector of a VLM directory or an mmproj ``.gguf`` file."""
        ...

    def encode(
        self,
        px: Pixels,
        method: str = "full",
        budget: Budget | None = None,
        mode: str = "spatial",
    ) -> EncodedImage:
        """Encode an image's views and keep the tokens ``method`` picks, in prompt order."""
        ...


def load_tower(path: Path, framework: str, device: str = "cpu") -> VisionTower:
    """The image side of ``path`` on ``framework`` ("torch", on ``device``, or "mlx"): the
    one that runs where the language model does. Each framework is imported only here, as
    either may be missing."""
    if framework == "mlx":
        from edge_infer.vision.mlx.model import VisionModel as MLXVisionModel

        return MLXVisionModel.load(Path(path))
    if framework == "torch":
        from edge_infer.vision.torch.model import VisionModel as TorchVisionModel

        return TorchVisionModel.load(Path(path), device=device)
    raise ValueError(f"no vision tower for framework {framework!r} (supported: {FRAMEWORKS})")
