"""Our image preprocessing equals transformers' Pillow image processors, token counts included."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from edge_infer.vision.preprocess import ImageSpec, image_token_count, open_image, preprocess
from tests.support.vision_images import synthetic, tiny_tokenizer

transformers = pytest.importorskip("transformers")

# odd sizes, extreme aspect ratios, tiny images; (height, width)
SIZES = [(37, 53), (333, 337), (101, 500), (900, 17), (23, 901), (480, 640), (5, 3)]
MODES = ["RGB", "RGBA", "L", "LA", "P"]
CASES = [(hw, MODES[i % len(MODES)]) for i, hw in enumerate(SIZES)]


def spec_of(processor, tmp_path) -> ImageSpec:
    """Read the settings back from the file the processor writes, as a user's directory has."""
    processor.save_pretrained(tmp_path)
    return ImageSpec.from_dir(tmp_path)


def reference_pixels(processor, img: Image.Image) -> np.ndarray:
    out = processor(images=[img], return_tensors="np")["pixel_values"]
    return np.asarray(out)


def assert_close(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    assert ours.dtype == np.float32
    assert float(np.max(np.abs(ours - theirs))) <= 1e-6


@pytest.mark.parametrize("do_pad", [False, True])
@pytest.mark.parametrize(("hw", "mode"), CASES)
def test_llava_1_5_matches_transformers(tmp_path, hw, mode, do_pad):
    from transformers import LlavaImageProcessorPil

    proc = LlavaImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_pad=do_pad
    )
    spec = spec_of(proc, tmp_path)
    img = synthetic(*hw, mode=mode, seed=hw[0])
    px = preprocess(img, spec)
    assert_close(px.values, reference_pixels(proc, img))
    assert image_token_count(px, spec, patch=14) == 576


@pytest.mark.parametrize(("hw", "mode"), CASES)
def test_llava_next_matches_transformers(tmp_path, hw, mode):
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    proc = LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    spec = spec_of(proc, tmp_path)
    img = synthetic(*hw, mode=mode, seed=hw[1])
    px = preprocess(img, spec)
    assert_close(px.values, reference_pixels(proc, img)[0])
    assert px.base == 0 and px.grid[0] * px.grid[1] + 1 == px.values.shape[0]
    tok = tiny_tokenizer(["<image>"])
    full = LlavaNextProcessor(
        image_processor=proc,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    ids = full(text="<image>", images=[img])["input_ids"][0]
    expected = ids.count(tok.convert_tokens_to_ids("<image>"))
    assert image_token_count(px, spec, patch=14) == expected


@pytest.mark.parametrize(
    ("longest", "tile", "split"), [(4 * 364, 364, True), (4 * 64, 64, True), (256, 128, False)]
)
@pytest.mark.parametrize(("hw", "mode"), CASES[:5])
def test_idefics3_matches_transformers(tmp_path, hw, mode, longest, tile, split):
    from transformers import Idefics3ImageProcessorPil, Idefics3Processor

    proc = Idefics3ImageProcessorPil(
        size={"longest_edge": longest},
        max_image_size={"longest_edge": tile},
        do_image_splitting=split,
    )
    spec = spec_of(proc, tmp_path)
    assert spec.kind == "idefics3" and spec.resample == Image.Resampling.LANCZOS
    img = synthetic(*hw, mode=mode, seed=hw[0] + hw[1])
    px = preprocess(img, spec)
    assert_close(px.values, reference_pixels(proc, img)[0])
    assert px.base == px.values.shape[0] - 1
    patch, merge = 16, 2
    seq = (tile // patch) ** 2 // merge**2
    special = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    tok = tiny_tokenizer(special + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])
    full = Idefics3Processor(image_processor=proc, tokenizer=tok, image_seq_len=seq)
    ids = full(text="<image>", images=[img])["input_ids"][0]
    expected = ids.count(tok.convert_tokens_to_ids("<image>"))
    assert image_token_count(px, spec, patch=patch, merge=merge) == expected


def test_smolvlm_processor_settings_read_as_idefics3(tmp_path):
    from transformers import SmolVLMImageProcessorPil

    proc = SmolVLMImageProcessorPil(
        size={"longest_edge": 2048}, max_image_size={"longest_edge": 512}
    )
    img = synthetic(300, 410, seed=5)
    spec = spec_of(proc, tmp_path)
    px = preprocess(img, spec)
    assert_close(px.values, reference_pixels(proc, img)[0])
    assert px.grid == (3, 4) and px.values.shape == (13, 3, 512, 512)


def test_exif_orientation_is_applied():
    img = synthetic(20, 40, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    upright = open_image(buf.getvalue())
    assert upright.size == (20, 40) and upright.mode == "RGB"


def test_transparency_is_laid_on_white_and_bad_files_are_named(tmp_path):
    clear = Image.new("RGBA", (3, 2), (10, 20, 30, 0))
    assert np.all(np.asarray(open_image(clear)) == 255)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        open_image(bad)
    cfg = tmp_path / "preprocessor_config.json"
    cfg.write_text(json.dumps({"image_processor_type": "Qwen2VLImageProcessor"}))
    with pytest.raises(ValueError, match="preprocessor_config.json.*Qwen2VLImageProcessor"):
        ImageSpec.from_dir(tmp_path)
