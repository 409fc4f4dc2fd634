"""A VLM's image side in torch: tower, projector, and dropping before the language model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from edge_infer.vision import dropping
from edge_infer.vision.dropping import Budget
from edge_infer.vision.preprocess import Pixels
from edge_infer.vision.spec import VisionSpec, vision_key
from edge_infer.vision.torch.encoder import Encoder, activation


class LlavaProjector(nn.Module):
    """LLaVA's two-layer MLP from the tower's width to the text model's."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.linear_1 = nn.Linear(spec.tower.hidden, spec.text_hidden)
        self.linear_2 = nn.Linear(spec.text_hidden, spec.text_hidden)
        self.act = activation(spec.projector_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class Idefics3Connector(nn.Module):
    """Pixel shuffle (each s x s patch block becomes one token) and a linear map."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        s = spec.scale_factor
        self.s = s
        self.proj = nn.Linear(spec.tower.hidden * s * s, spec.text_hidden, bias=False)

    def shuffle(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        side, s = int(round(n**0.5)), self.s
        x = x.reshape(b, side // s, s, side // s, s, d).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(b, (side // s) ** 2, s * s * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.shuffle(x))


@dataclass
class Encoded:
    """An image's embeddings for the language model and what dropping kept.

    ``embeds`` [kept, text_hidden] in prompt order; ``kept`` per partition (in ``Pixels``
    order) the kept token indices; ``total`` tokens without dropping; ``skipped`` partitions
    whose encoder pass never ran.
    """

    embeds: torch.Tensor
    kept: list[np.ndarray]
    total: int
    skipped: int


class VisionModel(nn.Module):
    """Tower + projector of a LLaVA-1.5 or Idefics3/SmolVLM directory."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.spec = spec
        self.tower = Encoder(spec.tower)
        self.projector = LlavaProjector(spec) if spec.arch == "llava" else Idefics3Connector(spec)

    @classmethod
    def load(
        cls, path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> VisionModel:
        """From a Hugging Face directory (config.json + safetensors, 4.x or 5.x names)."""
        path = Path(path)
        model = cls(VisionSpec.from_dir(path))
        want = model.state_dict()
        found: dict[str, torch.Tensor] = {}
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path}: no .safetensors weights")
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    key = vision_key(name)
                    if key is not None and key in want:
                        found[key] = st.get_tensor(name)
        missing = sorted(set(want) - set(found))
        if missing:
            raise ValueError(f"{path}: vision weights missing, e.g. {missing[0]}")
        model.load_state_dict(found)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)

    @property
    def tokens_per_view(self) -> int:
        return self.spec.tokens_per_view

    def scores_of(self, raw: torch.Tensor) -> np.ndarray:
        """Per-token scores of one layer as numpy, grouped per LLM token for pixel shuffle."""
        s = raw.float().cpu().numpy()
        f = self.spec.scale_factor
        g = self.spec.tower.grid
        return dropping.group_scores(s, g, g, f) if f > 1 else s

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.spec.arch == "llava":
            hidden = hidden[:, 1:]  # the CLS token never reaches the language model
        return self.projector(hidden)

    @torch.inference_mode()
    def run(self, views: torch.Tensor, score_layers: tuple[int, ...] = ()):
        return self.tower.run(views, self.spec.layers_run, score_layers)

    @torch.inference_mode()
    def features(self, views: torch.Tensor) -> torch.Tensor:
        """Projected features of every view, no dropping: [P, tokens, text_hidden]."""
        hidden, _ = self.run(views)
        return self.project(hidden)

    def tile_map(self, px: Pixels) -> np.ndarray | None:
        n_tiles = px.values.shape[0] - 1
        if n_tiles == 0:
            return None
        side = int(round(self.tokens_per_view**0.5))
        if self.spec.arch == "idefics3":
            return dropping.stretched_tile_map(px.grid[0], px.grid[1], (side, side))
        assert px.canvas_hw is not None
        return dropping.anyres_tile_map(
            px.image_hw, px.canvas_hw, px.values.shape[-1], (side, side)
        )

    @torch.inference_mode()
    def encode(
        self,
        px: Pixels,
        method: str = "full",
        budget: Budget | None = None,
        mode: str = "spatial",
    ) -> Encoded:
        """Encode an image's views, dropping tokens by ``method`` before projection results are
        gathered; HiRED encodes the base view first and skips tiles it gives no budget."""
        budget = budget or Budget()
        param = next(self.parameters())
        views = torch.from_numpy(px.values).to(param.device)
        n_views, n = views.shape[0], self.tokens_per_view
        last = self.spec.layers_run - 1
        order = [i for i in range(n_views) if i != px.base]  # tiles in order
        skipped = 0
        if method == "full":
            feats = self.features(views)
            kept = dropping.full(n_views, n)
        elif method == "uniform":
            feats = self.features(views)
            kept = dropping.uniform(n_views, n, budget.rate)
        elif method == "cls-topk":
            hidden, scores = self.run(views, (last,))
            feats = self.project(hidden)
            kept = dropping.cls_topk(self.scores_of(scores[last]), budget.rate)
        elif method == "hired":
            base_hidden, base_scores = self.run(views[px.base : px.base + 1], (0, last))
            alloc = dropping.allocate_hired(
                self.scores_of(base_scores[0])[0],
                len(order),
                budget,
                mode=mode,
                tile_of_token=self.tile_map(px),
                n=n,
            )
            feats = torch.empty(
                n_views, n, self.spec.text_hidden, dtype=param.dtype, device=views.device
            )
            feats[px.base] = self.project(base_hidden)[0]
            final_tiles: list[np.ndarray | None] = [None] * len(order)
            run = [t for t, k in enumerate(alloc.tiles) if k > 0]
            skipped = len(order) - len(run)
            if run:
                idx = [order[t] for t in run]
                hidden, scores = self.run(views[idx], (last,))
                feats[idx] = self.project(hidden).to(feats.dtype)
                tile_scores = self.scores_of(scores[last])
                for j, t in enumerate(run):
                    final_tiles[t] = tile_scores[j]
            picked = dropping.select_hired(self.scores_of(base_scores[last])[0], final_tiles, alloc)
            kept = [np.zeros(0, dtype=np.int64)] * n_views
            kept[px.base] = picked[0]
            for t, i in enumerate(order):
                kept[i] = picked[t + 1]
        else:
            raise ValueError(
                f"unknown dropping method {method!r}; expected one of {dropping.METHODS}"
            )
        parts = [feats[i, torch.from_numpy(kept[i]).to(feats.device)] for i in range(n_views)]
        return Encoded(torch.cat(parts, dim=0), kept, n_views * n, skipped)
