"""Tiny random VLMs of the real architectures, built and saved by transformers (tests only)."""

from __future__ import annotations

from pathlib import Path

TEXT = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=160,
)


def tiny_llava(path: Path, seed: int = 0, image_size: int = 28, patch: int = 7):
    """A LLaVA-1.5 (CLIP with CLS, select layer -2, MLP projector) saved to ``path``."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    from transformers import LlavaForConditionalGeneration as Llava

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        projection_dim=16,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=LlamaConfig(**TEXT),
        image_token_index=159,
        image_seq_length=(image_size // patch) ** 2,
    )
    model = Llava(cfg).eval()
    scale_up(model)
    model.save_pretrained(path)
    return model


def tiny_idefics3(path: Path, seed: int = 0, image_size: int = 32, patch: int = 4, scale: int = 2):
    """An Idefics3/SmolVLM (SigLIP without CLS, pixel shuffle + linear) saved to ``path``."""
    import torch
    from transformers import Idefics3Config, LlamaConfig
    from transformers import Idefics3ForConditionalGeneration as Idefics3
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    torch.manual_seed(seed)
    vision = Idefics3VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
    )
    cfg = Idefics3Config(
        vision_config=vision.to_dict(),
        text_config=LlamaConfig(**TEXT).to_dict(),
        image_token_id=159,
        scale_factor=scale,
    )
    model = Idefics3(cfg).eval()
    scale_up(model)
    model.save_pretrained(path)
    return model


def scale_up(model) -> None:
    """Random init is near zero (std 0.02): widen it so attention is far from uniform and a
    wrong index or layer shows in the numbers."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and p.dim() >= 1:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))
