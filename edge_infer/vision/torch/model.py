"""A VLM's image side in torch: tower, projector, and dropping before the language model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from edge_infer.models.gguf.mmproj import read_mmproj
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
        self.projector = (
            Idefics3Connector(spec) if spec.arch == "idefics3" else LlavaProjector(spec)
        )
        if spec.arch == "llava_next":  # ends each row of the tiles' grid
            self.newline = nn.Parameter(torch.zeros(spec.text_hidden))

    @classmethod
    def load(
        cls, path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> VisionModel:
        """From a Hugging Face directory (config.json + safetensors, 4.x or 5.x names) or a
        llama.cpp mmproj ``.gguf`` file."""
        path = Path(path)
        if path.suffix == ".gguf":
            mm = read_mmproj(path)
            spec = VisionSpec.from_config(mm.config, str(path))
            tensors = {k: torch.from_numpy(v) for k, v in mm.tensors.items()}
            return cls.from_tensors(spec, tensors, path, dtype, device)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{path}: no .safetensors weights")
        tensors = {}
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    if vision_key(name) is not None:
                        tensors[name] = st.get_tensor(name)
        return cls.from_tensors(VisionSpec.from_dir(path), tensors, path, dtype, device)

    @classmethod
    def from_tensors(
        cls,
        spec: VisionSpec,
        tensors: dict[str, torch.Tensor],
        path: Path,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> VisionModel:
        """A model of ``spec`` over weights under transformers' names (either version's)."""
        model = cls(spec)
        want = model.state_dict()
        found: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            key = vision_key(name)
            if key is not None and key in want:
                found[key] = t
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
        if self.spec.tower.has_cls:
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

    def encode_views(
        self, views: torch.Tensor, idx: list[int], score_layers: tuple[int, ...]
    ) -> tuple[torch.Tensor, dict[int, np.ndarray]]:
        """Projected features [len(idx), tokens, text_hidden] and scores of views ``idx``, run
        as one batch (every method batches the same way, so ``rate=1`` is bit-identical)."""
        hidden, scores = self.run(views[idx], score_layers)
        return self.project(hidden), {k: self.scores_of(v) for k, v in scores.items()}

    @torch.inference_mode()
    def encode(
        self,
        px: Pixels,
        method: str = "full",
        budget: Budget | None = None,
        mode: str = "spatial",
    ) -> Encoded:
        """Encode an image's views and keep the tokens ``method`` picks, in prompt order.

        The base view runs first, then the tiles as one batch; HiRED sizes the tiles' budgets
        from the base view and never runs a tile whose budget is zero.
        """
        if method not in dropping.METHODS:
            raise ValueError(
                f"unknown dropping method {method!r}; expected one of {dropping.METHODS}"
            )
        budget = budget or Budget()
        param = next(self.parameters())
        views = torch.from_numpy(px.values).to(param.device)
        n_views, n = views.shape[0], self.tokens_per_view
        last = self.spec.layers_run - 1
        tiles = [i for i in range(n_views) if i != px.base]
        wanted = {"hired": (0, last), "cls-topk": (last,)}.get(method, ())
        base_feats, base_scores = self.encode_views(views, [px.base], wanted)
        feats = torch.empty(
            n_views, n, self.spec.text_hidden, dtype=param.dtype, device=views.device
        )
        feats[px.base] = base_feats[0]
        scores = np.full((n_views, n), -np.inf)
        if last in base_scores:
            scores[px.base] = base_scores[last][0]
        run = tiles
        alloc = None
        if method == "hired":
            alloc = dropping.allocate_hired(
                base_scores[0][0],
                len(tiles),
                budget,
                mode=mode,
                tile_of_token=self.tile_map(px),
                n=n,
            )
            run = [i for i, k in zip(tiles, alloc.tiles, strict=True) if k > 0]
        if run:
            tile_feats, tile_scores = self.encode_views(views, run, wanted[-1:])
            feats[run] = tile_feats
            if last in tile_scores:
                scores[run] = tile_scores[last]
        if mode == "spatial" or method == "cls-topk":  # padding is picked last
            scores = np.where(self.valid_tokens(px), scores, -np.inf)
        if method == "full":
            kept = dropping.full(n_views, n)
        elif method == "uniform":
            kept = dropping.uniform(n_views, n, budget.rate)
        elif method == "cls-topk":
            kept = dropping.cls_topk(scores, budget.rate)
        else:
            assert alloc is not None
            ran = set(run)
            picked = dropping.select_hired(
                scores[px.base], [scores[i] if i in ran else None for i in tiles], alloc
            )
            kept = [np.zeros(0, dtype=np.int64)] * n_views
            for i, k in zip([px.base, *tiles], picked, strict=True):
                kept[i] = k
        skipped = len(tiles) - len(run)
        if self.spec.arch == "llava_next" and n_views > 1:
            embeds, total = self.pack_tiles(feats, kept, px)
            return Encoded(embeds, kept, total, skipped)
        parts = [feats[i, torch.from_numpy(kept[i]).to(feats.device)] for i in range(n_views)]
        return Encoded(torch.cat(parts, dim=0), kept, n_views * n, skipped)

    def valid_tokens(self, px: Pixels) -> np.ndarray:
        """[views, tokens]: False where a LLaVA-NeXT tile's token lies in padding."""
        n_views, n = px.values.shape[0], self.tokens_per_view
        valid = np.ones((n_views, n), dtype=bool)
        if self.spec.arch != "llava_next" or n_views == 1:
            return valid
        gh, gw = px.grid
        g = self.spec.tower.grid
        r0, r1, c0, c1 = unpadded_region(px.image_hw, (gh * g, gw * g))
        inside = np.zeros((gh * g, gw * g), dtype=bool)
        inside[r0:r1, c0:c1] = True
        valid[1:] = inside.reshape(gh, g, gw, g).transpose(0, 2, 1, 3).reshape(gh * gw, n)
        return valid

    def pack_tiles(
        self, feats: torch.Tensor, kept: list[np.ndarray], px: Pixels
    ) -> tuple[torch.Tensor, int]:
        """LLaVA-NeXT's order: the base view's kept tokens, then the tiles as one grid without
        its padding, row by row, each row that keeps a token ending in ``image_newline``.
        Returns the embeddings and the token count without dropping."""
        gh, gw = px.grid
        g = self.spec.tower.grid
        d = feats.shape[-1]
        grid = feats[1:].reshape(gh, gw, g, g, d).permute(0, 2, 1, 3, 4).reshape(gh * g, gw * g, d)
        mask = np.zeros((gh * gw, g * g), dtype=bool)
        for t in range(gh * gw):
            mask[t, kept[t + 1]] = True
        mask = mask.reshape(gh, gw, g, g).transpose(0, 2, 1, 3).reshape(gh * g, gw * g)
        r0, r1, c0, c1 = unpadded_region(px.image_hw, (gh * g, gw * g))
        grid, mask = grid[r0:r1, c0:c1], mask[r0:r1, c0:c1]
        rows = mask.any(axis=1)
        with_newline = torch.cat(
            [grid, self.newline.to(grid.dtype).expand(grid.shape[0], 1, d)], dim=1
        )
        keep = torch.from_numpy(np.concatenate([mask, rows[:, None]], axis=1).reshape(-1))
        tiles = with_newline.reshape(-1, d)[keep.to(grid.device)]
        base = feats[0, torch.from_numpy(kept[0]).to(feats.device)]
        total = g * g + (r1 - r0) * (c1 - c0 + 1)
        return torch.cat([base, tiles]), total


def unpadded_region(
    image_hw: tuple[int, int], grid_hw: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Rows and columns of the tiles' token grid that hold the image, not LLaVA-NeXT's padding
    (rounded as transformers' ``unpad_image``)."""
    h, w = image_hw
    gh, gw = grid_hw
    if w / h > gw / gh:
        new_h = int(round(h * (gw / w), 7))
        pad = (gh - new_h) // 2
        return pad, gh - pad, 0, gw
    new_w = int(round(w * (gh / h), 7))
    pad = (gw - new_w) // 2
    return 0, gh, pad, gw - pad
