"""Tiny random VLMs of the real architectures, built and saved by transformers (tests only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


def tiny_llava_next(path: Path, seed: int = 0, feature_layer: int = -2):
    """A LLaVA-NeXT (CLIP, anyres tiles of 28 px, 4x4 tokens each, image_newline) whose
    projector reads hidden state ``feature_layer``."""
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
        vision_feature_layer=feature_layer,
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


# transformers' tower names -> llama.cpp's mmproj names (blocks handled apart)
_MMPROJ_NAMES = {
    "embeddings.class_embedding": "v.class_embd",
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "embeddings.position_embedding.weight": "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
    "post_layernorm.weight": "v.post_ln.weight",
    "post_layernorm.bias": "v.post_ln.bias",
}
_MMPROJ_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}


def write_mmproj(vlm_dir: Path, out: Path, legacy: bool = False) -> Path:
    """A VLM directory's tower and projector as llama.cpp's mmproj GGUF.

    LLaVA's file holds every layer (llama.cpp reads the last but one); ``legacy`` writes it as
    old exports did: without the last layer's tensors and with FFN up/down names swapped.
    A feature layer other than the last but one is written as llama.cpp's converter does: a
    hidden-state index in ``clip.vision.feature_layer``, and only the blocks below it.
    LLaVA-NeXT adds its pinpoints (flat, width before height), merge type ``spatial_unpad``
    and ``image_newline`` (``model.image_newline`` in legacy files, ``v.image_newline`` else).
    """
    import json

    import gguf
    from safetensors.numpy import load_file

    from edge_infer.vision.spec import vision_key

    cfg = json.loads((vlm_dir / "config.json").read_text())
    v = cfg["vision_config"]
    idefics3 = cfg["model_type"] in ("idefics3", "smolvlm")
    layers = v["num_hidden_layers"]
    picked = cfg.get("vision_feature_layer", -2)
    picked = None if idefics3 or picked == -2 else picked % (layers + 1)
    w = gguf.GGUFWriter(str(out), arch="clip")
    w.add_string("clip.projector_type", "idefics3" if idefics3 else "mlp")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.use_gelu", idefics3)
    w.add_uint32("clip.vision.embedding_length", v["hidden_size"])
    w.add_uint32("clip.vision.feed_forward_length", v["intermediate_size"])
    w.add_uint32("clip.vision.block_count", layers if picked is None else picked)
    w.add_uint32("clip.vision.attention.head_count", v["num_attention_heads"])
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v["layer_norm_eps"])
    w.add_uint32("clip.vision.image_size", v["image_size"])
    w.add_uint32("clip.vision.patch_size", v["patch_size"])
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    if idefics3:
        w.add_uint32("clip.vision.projector.scale_factor", cfg["scale_factor"])
    if picked is not None:
        w.add_array("clip.vision.feature_layer", [picked])
    if cfg["model_type"] == "llava_next":
        w.add_array(
            "clip.vision.image_grid_pinpoints",
            [x for h, wd in cfg["image_grid_pinpoints"] for x in (wd, h)],
        )
        w.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")
        w.add_uint32("clip.vision.image_crop_resolution", v["image_size"])
    last = layers - 1
    for name, arr in sorted(load_file(str(vlm_dir / "model.safetensors")).items()):
        key = vision_key(name)
        if key is None:
            continue
        if key == "newline":
            w.add_tensor(
                "model.image_newline" if legacy else "v.image_newline", arr.astype(np.float32)
            )
            continue
        rest = key.split(".", 1)[1]
        if key.startswith("projector."):
            gg = {
                "linear_1.weight": "mm.0.weight",
                "linear_1.bias": "mm.0.bias",
                "linear_2.weight": "mm.2.weight",
                "linear_2.bias": "mm.2.bias",
                "proj.weight": "mm.model.fc.weight",
            }[rest]
        elif rest.startswith("encoder.layers."):
            layer, tail = rest[len("encoder.layers.") :].split(".", 1)
            module, kind = tail.rsplit(".", 1)
            part = _MMPROJ_BLOCK[module]
            if picked is not None and int(layer) >= picked:
                continue
            if legacy:
                if int(layer) == last:
                    continue
                part = {"ffn_up": "ffn_down", "ffn_down": "ffn_up"}.get(part, part)
            gg = f"v.blk.{layer}.{part}.{kind}"
        elif rest.startswith("post_layernorm."):
            if not idefics3:  # LLaVA never reads the tower's post-norm
                continue
            gg = _MMPROJ_NAMES[rest]
        else:
            gg = _MMPROJ_NAMES[rest]
        w.add_tensor(gg, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


_TEXT_LAYER_NAMES = (
    ("attn_norm.weight", "input_layernorm.weight"),
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
)


def write_text_gguf(vlm_dir: Path, out: Path, template: str | None = None) -> Path:
    """A VLM directory's language model as llama.cpp's text GGUF (F32, Q/K rows permuted as
    its converter does; the test tokenizer padded to the vocabulary with ``<image>`` last;
    ``template`` its chat template)."""
    import json

    import gguf
    from safetensors.numpy import load_file

    from tests.support.model_files import (
        BOS_ID,
        EOS_ID,
        MERGES,
        SPECIAL_TOKENS,
        permute_qk,
        tiny_vocab,
    )

    t = json.loads((vlm_dir / "config.json").read_text())["text_config"]
    prefixes = ("language_model.model.", "model.language_model.", "model.text_model.")
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    for i in range(t["num_hidden_layers"]):
        for g, h in _TEXT_LAYER_NAMES:
            names[f"layers.{i}.{h}"] = f"blk.{i}.{g}"
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_vocab_size(t["vocab_size"])
    w.add_context_length(t["max_position_embeddings"])
    w.add_embedding_length(t["hidden_size"])
    w.add_feed_forward_length(t["intermediate_size"])
    w.add_block_count(t["num_hidden_layers"])
    w.add_head_count(t["num_attention_heads"])
    w.add_head_count_kv(t["num_key_value_heads"])
    w.add_rope_freq_base(t["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(t["rms_norm_eps"])
    w.add_rope_dimension_count(t["head_dim"])
    tokens = tiny_vocab()
    pads = [f"<pad{i}>" for i in range(t["vocab_size"] - len(tokens) - 1)]
    tokens = [*tokens, *pads, "<image>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(
        [
            gguf.TokenType.CONTROL if tok in SPECIAL_TOKENS or i >= 268 else gguf.TokenType.NORMAL
            for i, tok in enumerate(tokens)
        ]
    )
    w.add_token_merges(list(MERGES))
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(False)
    if template is not None:
        w.add_chat_template(template)
    for name, arr in sorted(load_file(str(vlm_dir / "model.safetensors")).items()):
        if name.endswith("lm_head.weight"):
            w.add_tensor("output.weight", arr.astype(np.float32))
            continue
        inner = next((name[len(p) :] for p in prefixes if name.startswith(p)), None)
        if inner is None:
            continue
        g = names[inner]
        if g.endswith("attn_q.weight"):
            arr = permute_qk(arr, t["num_attention_heads"])
        elif g.endswith("attn_k.weight"):
            arr = permute_qk(arr, t["num_key_value_heads"])
        w.add_tensor(g, arr.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def llava_user_dir(path: Path, seed: int = 2, template: str | None = None):
    """A tiny LLaVA-1.5 directory as users have it: weights, tokenizer, chat template and
    preprocessor_config.json (28-px CLIP views). Returns transformers' model of it."""
    import json

    hf = tiny_llava(path, seed=seed)
    add_tokenizer(
        path, template or "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    )
    (path / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": 28},
                "crop_size": {"height": 28, "width": 28},
            }
        )
    )
    return hf
