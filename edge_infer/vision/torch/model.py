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
from edge_infer.vision import plan as vision_plan
from edge_infer.vision.dropping import Budget
from edge_infer.vision.preprocess import Pixels
from edge_infer.vision.spec import VisionSpec, channels_last_patch_kernel, vision_key
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

    def numpy_embeds(self) -> np.ndarray:
        """``embeds`` as float32 numpy, on the CPU."""
        return self.embeds.float().cpu().numpy()


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
                found[key] = (
                    t.permute(0, 3, 1, 2) if channels_last_patch_kernel(key, t.shape) else t
                )
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

    def valid_tokens(self, px: Pixels) -> np.ndarray:
        """[views, tokens]: False where a LLaVA-NeXT tile's token lies in padding."""
        return vision_plan.valid_tokens(self.spec, px)

    def encode_views(
        self, views: torch.Tensor, idx: list[int], score_layers: tuple[int, ...]
    ) -> tuple[torch.Tensor, dict[int, np.ndarray]]:
        """Projected features [len(idx), tokens, text_hidden] and scores of views ``idx``, run
        as one batch."""
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
        """Encode an image's views and keep the tokens ``method`` picks, in prompt order (see
        ``vision.plan``: tiles without budget never run)."""
        param = next(self.parameters())
        views = torch.from_numpy(px.values).to(param.device)
        n_views, n, d = views.shape[0], self.tokens_per_view, self.spec.text_hidden
        feats = torch.empty(n_views, n, d, dtype=param.dtype, device=views.device)

        def run_views(idx: list[int], layers: tuple[int, ...]) -> dict[int, np.ndarray]:
            f, scores = self.encode_views(views, idx, layers)
            feats[idx] = f
            return scores

        p = vision_plan.plan(self.spec, px, run_views, method, budget, mode)
        table = feats.reshape(-1, d)
        if self.spec.arch == "llava_next":
            table = torch.cat([table, self.newline.to(table.dtype)[None]])
        embeds = table[torch.from_numpy(p.order).to(table.device)]
        return Encoded(embeds, p.kept, p.total, p.skipped)
