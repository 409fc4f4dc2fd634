"""A CLIP or SigLIP vision transformer in torch that also yields HiRED's attention scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edge_infer.vision.spec import TowerSpec

QUERY_CHUNK = 256  # queries per softmax block when scoring received attention


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unsupported activation {name!r} in the vision config")


class Attention(nn.Module):
    def __init__(self, spec: TowerSpec):
        super().__init__()
        d = spec.hidden
        self.heads = spec.heads
        self.scale = (d // spec.heads) ** -0.5
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, -1).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, score: str | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self.split(self.q_proj(x)), self.split(self.k_proj(x)), self.split(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = self.out_proj(out.transpose(1, 2).reshape(x.shape))
        if score == "cls":
            return out, cls_row(q, k, self.scale)
        if score == "received":
            return out, received(q, k, self.scale)
        return out, None


def cls_row(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The CLS query's attention on the patch tokens, heads summed: [B, S-1]. Only this row."""
    row = torch.softmax((q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
    return row[:, :, 0, 1:].sum(dim=1)


def received(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Mean attention each token receives over heads and queries: [B, S], in query blocks."""
    b, h, s, _ = q.shape
    kt = k.float().transpose(-1, -2)
    total = torch.zeros(b, s, dtype=torch.float32, device=q.device)
    for i in range(0, s, QUERY_CHUNK):
        probs = torch.softmax((q[:, :, i : i + QUERY_CHUNK].float() @ kt) * scale, dim=-1)
        total += probs.sum(dim=(1, 2))
    return total / (h * s)


class Mlp(nn.Module):
    def __init__(self, spec: TowerSpec):
        super().__init__()
        self.fc1 = nn.Linear(spec.hidden, spec.intermediate)
        self.fc2 = nn.Linear(spec.intermediate, spec.hidden)
        self.act = activation(spec.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, spec: TowerSpec):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(spec.hidden, eps=spec.eps)
        self.self_attn = Attention(spec)
        self.layer_norm2 = nn.LayerNorm(spec.hidden, eps=spec.eps)
        self.mlp = Mlp(spec)

    def forward(
        self, x: torch.Tensor, score: str | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, scores = self.self_attn(self.layer_norm1(x), score)
        x = x + a
        return x + self.mlp(self.layer_norm2(x)), scores


class Embeddings(nn.Module):
    def __init__(self, spec: TowerSpec):
        super().__init__()
        self.spec = spec
        d, g = spec.hidden, spec.grid
        self.patch_embedding = nn.Conv2d(3, d, spec.patch, stride=spec.patch, bias=not spec.has_cls)
        if spec.has_cls:
            self.class_embedding = nn.Parameter(torch.zeros(d))
        self.position_embedding = nn.Embedding(g * g + int(spec.has_cls), d)

    def positions(self, gh: int, gw: int, device) -> torch.Tensor:
        """SigLIP's (Idefics3's) bucketed positions for a gh x gw patch grid."""
        g = self.spec.grid
        if (gh, gw) == (g, g):
            return torch.arange(g * g, device=device)
        bounds = torch.arange(1 / g, 1.0, 1 / g, device=device)
        fh = torch.clamp(torch.arange(gh, device=device, dtype=torch.float32) / gh, max=1 - 1e-6)
        fw = torch.clamp(torch.arange(gw, device=device, dtype=torch.float32) / gw, max=1 - 1e-6)
        bh = torch.bucketize(fh, bounds, right=True)
        bw = torch.bucketize(fw, bounds, right=True)
        return (bh[:, None] * g + bw[None, :]).reshape(-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        if self.spec.has_cls:
            if (gh, gw) != (self.spec.grid, self.spec.grid):
                raise ValueError(
                    f"CLIP tower takes {self.spec.image_size}px views, got {pixels.shape}"
                )
            cls = self.class_embedding.expand(x.shape[0], 1, -1)
            return torch.cat([cls, x], dim=1) + self.position_embedding.weight
        return x + self.position_embedding(self.positions(gh, gw, x.device))


class Encoder(nn.Module):
    """The tower. ``run`` stops after the layers the projector needs and scores chosen layers."""

    def __init__(self, spec: TowerSpec):
        super().__init__()
        self.spec = spec
        self.embeddings = Embeddings(spec)
        # CLIP normalises before the encoder, SigLIP after it (names as in the weight files)
        if spec.has_cls:
            self.pre_layrnorm = nn.LayerNorm(spec.hidden, eps=spec.eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(Block(spec) for _ in range(spec.layers))
        if not spec.has_cls:
            self.post_layernorm = nn.LayerNorm(spec.hidden, eps=spec.eps)

    def run(
        self, pixels: torch.Tensor, n_layers: int, score_layers: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Hidden states after ``n_layers`` layers (SigLIP: post-normed after the last one) and
        per-token scores at ``score_layers`` (CLS row over patches, or received attention)."""
        x = self.embeddings(pixels)
        if self.spec.has_cls:
            x = self.pre_layrnorm(x)
        kind = "cls" if self.spec.has_cls else "received"
        scores: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.encoder.layers[:n_layers]):
            x, s = layer(x, kind if i in score_layers else None)
            if s is not None:
                scores[i] = s
        if not self.spec.has_cls and n_layers == self.spec.layers:
            x = self.post_layernorm(x)
        return x, scores
