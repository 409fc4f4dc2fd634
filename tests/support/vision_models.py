"""Tiny random VLMs of the real architectures, built and saved by transformers (tests only)."""

from __future__ import annotations

from pathlib import Path

IMAGE_TOKEN = 271
# LLaVA-NeXT's five canvases, scaled from 336-px tiles to 28-px ones
NEXT_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=272,  # the test tokenizer's 268 tokens, then the image token
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
        image_token_index=IMAGE_TOKEN,
        image_seq_length=(image_size // patch) ** 2,
    )
    model = Llava(cfg).eval()
    scale_up(model)
    model.save_pretrained(path)
    return model


def tiny_llava_next(path: Path, seed: int = 0):
    """A LLaVA-NeXT (CLIP, anyres tiles of 28 px, 4x4 tokens each, image_newline)."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig
    from transformers import LlavaNextForConditionalGeneration as LlavaNext

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=7,
        projection_dim=16,
    )
    cfg = LlavaNextConfig(
        vision_config=vision,
        text_config=LlamaConfig(**TEXT),
        image_token_index=IMAGE_TOKEN,
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    model = LlavaNext(cfg).eval()
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
        image_token_id=IMAGE_TOKEN,
        scale_factor=scale,
    )
    model = Idefics3(cfg).eval()
    scale_up(model)
    model.save_pretrained(path)
    return model


def scale_up(model) -> None:
    """Random init is near zero (std 0.02): widen the image side so attention is far from
    uniform and a wrong index or layer shows, and sharpen the output head so greedy choices
    have margins wider than our bfloat16 decoder's rounding."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("lm_head"):
                p.mul_(50.0)
            elif "norm" not in name and "language_model" not in name and "text_model" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))


def add_tokenizer(path: Path, template: str | None = None) -> Path:
    """The test tokenizer (and a chat template as a processor saves it) in a VLM directory,
    so it is one directory as users have it."""
    import json

    from tests.support.model_files import build_hf_tokenizer

    build_hf_tokenizer().save(str(path / "tokenizer.json"))
    if template is not None:
        (path / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    return path
