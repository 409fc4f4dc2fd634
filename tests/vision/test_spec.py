"""Reading a VLM's config.json and its weights' names from either transformers layout."""

from __future__ import annotations

import json

import pytest

from edge_infer.vision.spec import VisionSpec, vision_key

VISION = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_hidden_layers": 3,
    "intermediate_size": 64,
    "patch_size": 7,
    "image_size": 28,
}


@pytest.mark.parametrize(
    ("name", "key"),
    [
        (
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            "tower.encoder.layers.0.mlp.fc1.weight",
        ),
        ("model.vision_tower.vision_model.pre_layrnorm.bias", "tower.pre_layrnorm.bias"),
        ("vision_tower.embeddings.class_embedding", "tower.embeddings.class_embedding"),
        ("model.vision_model.post_layernorm.weight", "tower.post_layernorm.weight"),
        ("multi_modal_projector.linear_2.bias", "projector.linear_2.bias"),
        ("model.multi_modal_projector.linear_1.weight", "projector.linear_1.weight"),
        ("model.connector.modality_projection.proj.weight", "projector.proj.weight"),
        ("image_newline", "newline"),
        ("model.image_newline", "newline"),
        ("language_model.model.layers.0.mlp.up_proj.weight", None),
        ("model.text_model.embed_tokens.weight", None),
        ("lm_head.weight", None),
    ],
)
def test_weight_names_of_both_layouts(name, key):
    assert vision_key(name) == key


def test_configs_of_the_three_architectures():
    llava = VisionSpec.from_config(
        {"model_type": "llava", "vision_config": VISION, "text_config": {"hidden_size": 64}}
    )
    assert llava.tower.has_cls and llava.layers_run == 2 and llava.tokens_per_view == 16
    assert llava.tower.act == "quick_gelu" and llava.image_token_id == 32000
    nxt = VisionSpec.from_config(
        {
            "model_type": "llava_next",
            "vision_config": VISION,
            "text_config": {"hidden_size": 64},
            "image_grid_pinpoints": [[28, 56], [56, 28]],
        }
    )
    assert nxt.arch == "llava_next" and nxt.pinpoints == ((28, 56), (56, 28))
    smol = VisionSpec.from_config(
        {
            "model_type": "smolvlm",
            "vision_config": {**VISION, "patch_size": 4, "image_size": 32},
            "text_config": {"hidden_size": 64},
            "scale_factor": 2,
            "image_token_id": 49190,
        }
    )
    assert smol.arch == "idefics3" and not smol.tower.has_cls and smol.layers_run == 3
    assert smol.tokens_per_view == 16 and smol.tower.act == "gelu_pytorch_tanh"


def test_config_errors_name_the_file_and_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="config.json.*'llama' is not a supported VLM"):
        VisionSpec.from_dir(tmp_path)
    bad = {"model_type": "llava", "vision_config": {"hidden_size": 8}, "text_config": {}}
    with pytest.raises(
        ValueError, match="config.json: vision_config or text_config lacks num_attention_heads"
    ):
        VisionSpec.from_config(bad)
    cfg = {
        "model_type": "llava",
        "vision_config": VISION,
        "text_config": {"hidden_size": 64},
        "vision_feature_layer": [-2, -5],
    }
    with pytest.raises(ValueError, match="only one layer"):
        VisionSpec.from_config(cfg)
