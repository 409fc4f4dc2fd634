"""Image placeholders as the models' processors write them; keys that tell images apart."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.vision.dropping import Budget
from edge_infer.vision.preprocess import ImageSpec, Pixels, preprocess
from edge_infer.vision.prompt import image_key, image_prompt
from tests.support.vision_images import synthetic, tiny_tokenizer

SPECIAL = ["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
SPECIAL += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]


@pytest.mark.parametrize(("hw", "split"), [((100, 300), True), ((90, 60), True), ((50, 50), False)])
def test_idefics3_placeholders_equal_the_processors(tmp_path, hw, split):
    transformers = pytest.importorskip("transformers")
    proc = transformers.Idefics3ImageProcessorPil(
        size={"longest_edge": 128}, max_image_size={"longest_edge": 64}, do_image_splitting=split
    )
    proc.save_pretrained(tmp_path)
    img = synthetic(*hw)
    px = preprocess(img, ImageSpec.from_dir(tmp_path))
    tok = tiny_tokenizer(SPECIAL)
    full = transformers.Idefics3Processor(image_processor=proc, tokenizer=tok, image_seq_len=4)
    expected = full(text="<image>", images=[img])["input_ids"][0]
    ours = tok(image_prompt("idefics3", px, [4] * px.values.shape[0]))["input_ids"]
    assert ours == expected


def test_dropped_tokens_shorten_each_tile_and_llava_counts_embeddings():
    px = Pixels(np.zeros((5, 3, 4, 4), np.float32), (8, 8), (2, 2), 4)
    text = image_prompt("idefics3", px, [0, 3, 1, 0, 2])
    assert text.count("<image>") == 6 and "<row_2_col_2>" in text
    assert text.endswith("<global-img><image><image><fake_token_around_image>")
    assert image_prompt("llava_next", px, [612]) == "<image>" * 612


def test_image_keys_differ_by_pixels_and_dropping():
    a = preprocess(synthetic(20, 30, seed=1), ImageSpec())
    b = preprocess(synthetic(20, 30, seed=2), ImageSpec())
    key = image_key(a, "hired", Budget(0.2))
    assert key == image_key(
        preprocess(synthetic(20, 30, seed=1), ImageSpec()), "hired", Budget(0.2)
    )
    assert key != image_key(b, "hired", Budget(0.2))
    assert key != image_key(a, "hired", Budget(0.5))
    assert key != image_key(a, "hired", Budget(0.2), mode="reference")
    assert key != image_key(a, "cls-topk", Budget(0.2))
    assert image_key(a, "full", Budget(0.2)) == image_key(a, "full", Budget(0.9))
