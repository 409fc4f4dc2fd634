"""What a VLM directory's config.json says about its vision tower and projector."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARCHS = ("llava", "llava_next", "idefics3")
_ARCH_OF_TYPE = {
    "llava": "llava",
    "llava_next": "llava_next",
    "idefics3": "idefics3",
    "smolvlm": "idefics3",
}

# leading parts of a weight's name that transformers 4.x and 5.x put before the same tensor
_TOWER_PREFIXES = ("model.", "vision_tower.", "vision_model.")
_PROJECTOR_NAMES = {
    "multi_modal_projector.": "projector.",
    "connector.modality_projection.": "projector.",
}


@dataclass(frozen=True)
class TowerSpec:
    """A ViT: CLIP (with a CLS token, pre-norm) or SigLIP (no CLS, post-norm)."""

    hidden: int
    heads: int
    layers: int
    intermediate: int
    patch: int
    image_size: int
    eps: float
    act: str
    has_cls: bool

    @property
    def grid(self) -> int:
        return self.image_size // self.patch


@dataclass(frozen=True)
class VisionSpec:
    """A VLM's image side: tower, which layer feeds the projector, the projector, the token."""

    arch: str
    tower: TowerSpec
    text_hidden: int
    image_token_id: int
    feature_layer: int = -1  # index into hidden states (0: embeddings); -1: the last layer
    projector_act: str = "gelu"
    scale_factor: int = 1  # Idefics3's pixel shuffle
    pinpoints: tuple[tuple[int, int], ...] = ()  # LLaVA-NeXT's tile canvases (height, width)

    @property
    def layers_run(self) -> int:
        """Encoder layers needed for the projector's input (the rest are never run)."""
        n = self.tower.layers
        return self.feature_layer % (n + 1) if self.feature_layer < 0 else self.feature_layer

    @property
    def tokens_per_view(self) -> int:
        return self.tower.grid**2 // self.scale_factor**2

    @classmethod
    def from_config(cls, raw: dict[str, Any], where: str = "config.json") -> VisionSpec:
        model_type = str(raw.get("model_type", ""))
        if model_type not in _ARCH_OF_TYPE:
            raise ValueError(f"{where}: model_type {model_type!r} is not a supported VLM")
        arch = _ARCH_OF_TYPE[model_type]
        v, t = raw.get("vision_config"), raw.get("text_config")
        if not isinstance(v, dict) or not isinstance(t, dict):
            raise ValueError(f"{where}: needs vision_config and text_config")
        siglip = arch == "idefics3"
        try:
            tower = TowerSpec(
                hidden=int(v["hidden_size"]),
                heads=int(v["num_attention_heads"]),
                layers=int(v["num_hidden_layers"]),
                intermediate=int(v["intermediate_size"]),
                patch=int(v["patch_size"]),
                image_size=int(v["image_size"]),
                eps=float(v.get("layer_norm_eps", 1e-6 if siglip else 1e-5)),
                act=str(v.get("hidden_act", "gelu_pytorch_tanh" if siglip else "quick_gelu")),
                has_cls=not siglip,
            )
            text_hidden = int(t["hidden_size"])
        except KeyError as e:
            raise ValueError(f"{where}: vision_config or text_config lacks {e.args[0]}") from e
        if arch in ("llava", "llava_next"):
            layer = raw.get("vision_feature_layer", -2)
            if not isinstance(layer, int):
                raise ValueError(
                    f"{where}: vision_feature_layer {layer!r}: only one layer supported"
                )
            if raw.get("vision_feature_select_strategy", "default") != "default":
                raise ValueError(
                    f"{where}: only vision_feature_select_strategy 'default' supported"
                )
            return cls(
                arch,
                tower,
                text_hidden,
                int(raw.get("image_token_index", raw.get("image_token_id", 32000))),
                feature_layer=layer,
                projector_act=str(raw.get("projector_hidden_act", "gelu")),
                pinpoints=tuple(
                    (int(h), int(w)) for h, w in raw.get("image_grid_pinpoints", ()) or ()
                ),
            )
        return cls(
            arch,
            tower,
            text_hidden,
            int(raw.get("image_token_id", 128257)),
            feature_layer=-1,
            scale_factor=int(raw.get("scale_factor", 2)),
        )

    @classmethod
    def from_dir(cls, path: Path) -> VisionSpec:
        f = Path(path) / "config.json"
        try:
            raw = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: cannot read the model config ({e})") from e
        return cls.from_config(raw, str(f))


def vision_key(name: str) -> str | None:
    """A weight's name without its version-dependent prefix: ``tower.*``, ``projector.*`` or
    ``newline``.

    Returns None for the text model's weights.
    """
    rest = name.removeprefix("model.")
    if rest == "image_newline":
        return "newline"
    for old, new in _PROJECTOR_NAMES.items():
        if rest.startswith(old):
            return new + rest[len(old) :]
    if not rest.startswith(("vision_tower.", "vision_model.")):
        return None
    for prefix in _TOWER_PREFIXES:
        rest = rest.removeprefix(prefix)
    return "tower." + rest


def channels_last_patch_kernel(key: str, shape: tuple[int, ...]) -> bool:
    """Whether a patch-embedding kernel is stored [out, p, p, 3] as MLX's convolutions (and
    mlx-vlm's converted directories) keep it, not transformers' [out, 3, p, p]."""
    return (
        key.endswith("patch_embedding.weight")
        and len(shape) == 4
        and shape[-1] == 3
        and shape[1] != 3
    )
