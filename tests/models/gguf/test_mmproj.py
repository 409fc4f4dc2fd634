"""Reading llama.cpp's mmproj files: metadata, names, legacy FFN swap, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_infer.errors import ModelFormatError, UnsupportedModelError
from edge_infer.models.gguf.mmproj import anyres_pinpoints, layers_read, read_mmproj

gguf = pytest.importorskip("gguf")

HIDDEN, FF = 8, 16


def write(path, projector="mlp", swapped=False, blocks=2, extra=(), meta=None):
    w = gguf.GGUFWriter(str(path), arch="clip")
    w.add_string("clip.projector_type", projector)
    w.add_uint32("clip.vision.embedding_length", HIDDEN)
    w.add_uint32("clip.vision.feed_forward_length", FF)
    w.add_uint32("clip.vision.block_count", blocks)
    w.add_uint32("clip.vision.attention.head_count", 2)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_uint32("clip.vision.image_size", 8)
    w.add_uint32("clip.vision.patch_size", 4)
    for key, value in (meta or {}).items():
        (w.add_string if isinstance(value, str) else w.add_array)(key, value)
    rng = np.random.default_rng(0)
    fc1, fc2 = rng.standard_normal((FF, HIDDEN)), rng.standard_normal((HIDDEN, FF))
    for i in range(blocks):
        up, down = (fc2, fc1) if swapped else (fc1, fc2)
        w.add_tensor(f"v.blk.{i}.ffn_up.weight", up.astype(np.float32))
        w.add_tensor(f"v.blk.{i}.ffn_down.weight", down.astype(np.float32))
    w.add_tensor("mm.2.weight", np.ones((12, 12), np.float32))
    w.add_tensor("mm.model.fc.weight", np.ones((12, 4 * HIDDEN), np.float32))
    for name in extra:
        w.add_tensor(name, np.ones(12 if "newline" in name else HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, fc1, fc2


@pytest.mark.parametrize("swapped", [False, True])
def test_ffn_names_are_put_right_by_shape(tmp_path, swapped):
    path, fc1, fc2 = write(tmp_path / "m.gguf", "idefics3", swapped=swapped)
    mm = read_mmproj(path)
    assert mm.ffn_swapped is swapped
    layer = "model.vision_model.encoder.layers.1.mlp"
    np.testing.assert_array_equal(mm.tensors[f"{layer}.fc1.weight"], fc1.astype(np.float32))
    np.testing.assert_array_equal(mm.tensors[f"{layer}.fc2.weight"], fc2.astype(np.float32))
    assert mm.config["vision_config"]["layer_norm_eps"] == 1e-5
    assert mm.config["text_config"]["hidden_size"] == 12


def test_llava_reads_the_last_layer_but_one(tmp_path):
    path, _, _ = write(tmp_path / "m.gguf", "mlp", blocks=3)
    mm = read_mmproj(path)
    assert mm.config["vision_config"]["num_hidden_layers"] == 2
    assert not any(".layers.2." in k for k in mm.tensors)
    assert layers_read({"clip.vision.feature_layer": [5]}, "mlp", 24, path) == 5
    with pytest.raises(UnsupportedModelError, match="only one feature layer"):
        layers_read({"clip.vision.feature_layer": [3, 7]}, "mlp", 24, path)


def test_refusals_name_the_file(tmp_path):
    path, _, _ = write(tmp_path / "q.gguf", "qwen2vl_merger")
    with pytest.raises(UnsupportedModelError, match=r"q\.gguf.*qwen2vl_merger"):
        read_mmproj(path)
    path, _, _ = write(tmp_path / "p.gguf", "mlp", extra=("v.post_ln.weight",))
    with pytest.raises(UnsupportedModelError, match=r"p\.gguf.*post-norm"):
        read_mmproj(path)
    w = gguf.GGUFWriter(str(tmp_path / "e.gguf"), arch="clip")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match=r"e\.gguf.*clip\.vision\.embedding_length"):
        read_mmproj(tmp_path / "e.gguf")


NEXT = {"clip.vision.mm_patch_merge_type": "spatial_unpad"}


@pytest.mark.parametrize("newline", ["model.image_newline", "v.image_newline"])
def test_llava_next_pinpoints_are_width_then_height(tmp_path, newline):
    pins = {"clip.vision.image_grid_pinpoints": [8, 24, 16, 8]}  # 8 wide x 24 high, 16 x 8
    path, _, _ = write(tmp_path / "n.gguf", "mlp", extra=(newline,), meta=NEXT | pins)
    mm = read_mmproj(path)
    assert mm.config["model_type"] == "llava_next"
    assert mm.config["image_grid_pinpoints"] == [[24, 8], [8, 16]]
    np.testing.assert_array_equal(mm.tensors["image_newline"], np.ones(12, np.float32))
    # a LLaVA-1.5 file says nothing of tiles, or says "flat"
    flat = {"clip.vision.mm_patch_merge_type": "flat"}
    path, _, _ = write(tmp_path / "f.gguf", "mlp", meta=flat)
    assert read_mmproj(path).config["model_type"] == "llava"
    assert "image_grid_pinpoints" not in read_mmproj(path).config


@pytest.mark.parametrize(
    "meta, extra, error, message",
    [
        (
            {"clip.vision.mm_patch_merge_type": "spatial_pool"},
            (),
            UnsupportedModelError,
            r"m\.gguf: clip\.vision\.mm_patch_merge_type 'spatial_pool' is not supported",
        ),
        (
            NEXT | {"clip.vision.image_grid_pinpoints": [8, 24, 16]},
            ("v.image_newline",),
            ModelFormatError,
            r"m\.gguf: clip\.vision\.image_grid_pinpoints must be width, height pairs",
        ),
        (
            NEXT,
            ("v.image_newline",),
            ModelFormatError,
            r"m\.gguf: .*needs clip\.vision\.image_grid",
        ),
        (
            NEXT | {"clip.vision.image_grid_pinpoints": [8, 16]},
            (),
            ModelFormatError,
            r"m\.gguf: spatial_unpad mmproj lacks tensor model\.image_newline",
        ),
        (
            {"clip.vision.image_grid_pinpoints": [8, 16]},
            (),
            UnsupportedModelError,
            r"m\.gguf: clip\.vision\.mm_patch_merge_type 'flat' with image_grid_pinpoints",
        ),
    ],
)
def test_llava_next_refusals_name_the_file_and_key(tmp_path, meta, extra, error, message):
    path, _, _ = write(tmp_path / "m.gguf", "mlp", extra=extra, meta=meta)
    with pytest.raises(error, match=message) as info:
        read_mmproj(path)
    assert "\n" not in str(info.value)


def test_pinpoints_read_as_llama_cpp_pairs():
    meta = NEXT | {"clip.vision.image_grid_pinpoints": [336, 672, 1008, 336]}
    assert anyres_pinpoints(meta, Path("m.gguf")) == [[672, 336], [336, 1008]]
    assert anyres_pinpoints({}, Path("m.gguf")) == []
