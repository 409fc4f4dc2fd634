"""Our torch towers and projectors against transformers' forward (fp32, eager) on tiny VLMs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edge_infer.vision.dropping import Budget
from edge_infer.vision.preprocess import Pixels
from tests.support.vision_models import tiny_idefics3, tiny_llava

torch = pytest.importorskip("torch")
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
pytest.importorskip("transformers")

from edge_infer.vision.torch.model import VisionModel  # noqa: E402


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    hf = tiny_llava(path)
    hf.set_attn_implementation("eager")
    return path, hf


@pytest.fixture(scope="module")
def idefics3(tmp_path_factory):
    path = tmp_path_factory.mktemp("idefics3")
    hf = tiny_idefics3(path)
    hf.set_attn_implementation("eager")
    return path, hf


def image_features(out) -> torch.Tensor:
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


def views(n: int, side: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_llava_features_equal_transformers(llava):
    path, hf = llava
    ours = VisionModel.load(path)
    x = views(3, 28)
    with torch.no_grad():
        ref = image_features(
            hf.get_image_features(
                pixel_values=x, vision_feature_layer=-2, vision_feature_select_strategy="default"
            )
        )
    got = ours.features(x)
    assert got.shape == ref.shape == (3, 16, 64)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_cls_row_scores_equal_transformers_attentions(llava):
    path, hf = llava
    ours = VisionModel.load(path)
    x = views(2, 28, seed=1)
    with torch.no_grad():
        att = hf.model.vision_tower(pixel_values=x, output_attentions=True).attentions
        _, scores = ours.run(x, (0, 1))
    for layer in (0, 1):
        ref = att[layer][:, :, 0, 1:].sum(dim=1)
        torch.testing.assert_close(scores[layer], ref, rtol=1e-5, atol=1e-6)
    # the rows are far from uniform, so a wrong layer or column would show
    assert float(scores[1].std()) > 0.05


def test_idefics3_features_equal_transformers(idefics3):
    path, hf = idefics3
    ours = VisionModel.load(path)
    x = views(3, 32, seed=2)
    with torch.no_grad():
        ref = image_features(hf.get_image_features(pixel_values=x[None])).reshape(3, 16, 64)
    got = ours.features(x)
    assert got.shape == ref.shape == (3, 16, 64)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_received_scores_equal_transformers_attentions(idefics3):
    path, hf = idefics3
    ours = VisionModel.load(path)
    x = views(2, 32, seed=3)
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    with torch.no_grad():
        att = hf.model.vision_model(
            pixel_values=x, patch_attention_mask=mask, output_attentions=True
        ).attentions
        _, scores = ours.run(x, (0, 2))
    for layer in (0, 2):
        torch.testing.assert_close(scores[layer], att[layer].mean(dim=(1, 2)), rtol=1e-5, atol=1e-7)
    grouped = ours.scores_of(scores[2])
    assert grouped.shape == (2, 16)
    np.testing.assert_allclose(grouped.sum(axis=1), scores[2].sum(dim=1).numpy(), rtol=1e-5)


def test_both_transformers_layouts_load_the_same_weights(llava, tmp_path):
    """transformers 4.x wrote ``vision_tower.vision_model.*``; 5.x in memory ``model.*``."""
    from safetensors.torch import load_file, save_file

    path, _ = llava
    tensors = load_file(str(path / "model.safetensors"))
    renamed = {}
    for k, v in tensors.items():
        k = k.replace("vision_tower.", "model.vision_tower.vision_model.")
        renamed[k.replace("multi_modal_projector.", "model.multi_modal_projector.")] = v
    save_file(renamed, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    x = views(1, 28)
    torch.testing.assert_close(
        VisionModel.load(tmp_path).features(x), VisionModel.load(path).features(x)
    )
    cfg = json.loads((path / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "full"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json.*vision_feature_select_strategy"):
        VisionModel.load(tmp_path)


def smol_pixels(grid: tuple[int, int], side: int = 32, seed: int = 4) -> Pixels:
    n = grid[0] * grid[1] + 1
    values = views(n, side, seed).numpy()
    return Pixels(values, (side * grid[0], side * grid[1]), grid, n - 1)


def test_full_and_rate_one_give_every_projected_feature_in_order(idefics3):
    path, _ = idefics3
    ours = VisionModel.load(path)
    px = smol_pixels((2, 2))
    every = ours.features(torch.from_numpy(px.values)).reshape(-1, 64)
    full = ours.encode(px, "full")
    assert full.total == 80 and full.skipped == 0
    assert torch.equal(full.embeds, every)
    hired = ours.encode(px, "hired", Budget(1.0, 0.5))
    assert torch.equal(hired.embeds, every)


def test_hired_skips_tiles_without_budget_and_keeps_order(idefics3):
    path, _ = idefics3
    ours = VisionModel.load(path)
    px = smol_pixels((2, 3))
    every = ours.features(torch.from_numpy(px.values))
    for rate in (0.05, 0.2):
        enc = ours.encode(px, "hired", Budget(rate, 0.5))
        assert sum(len(k) for k in enc.kept) == int(7 * 16 * rate)
        assert enc.skipped == sum(1 for k in enc.kept[:-1] if len(k) == 0)
        expected = torch.cat([every[i, torch.from_numpy(k)] for i, k in enumerate(enc.kept)])
        torch.testing.assert_close(enc.embeds, expected)
    assert ours.encode(px, "hired", Budget(0.05, 0.5)).skipped > 0
    for method in ("uniform", "cls-topk"):
        enc = ours.encode(px, method, Budget(0.2))
        assert enc.embeds.shape == (int(7 * 16 * 0.2), 64) and enc.skipped == 0


def test_llava_hired_is_one_top_k_by_final_cls_attention(llava):
    path, _ = llava
    ours = VisionModel.load(path)
    px = Pixels(views(1, 28, seed=5).numpy(), (28, 28), (0, 0), 0)
    enc = ours.encode(px, "hired", Budget(0.25))
    _, scores = ours.run(torch.from_numpy(px.values), (1,))
    top = np.sort(np.argsort(-scores[1][0].numpy())[:4])
    assert enc.kept[0].tolist() == top.tolist()
    with pytest.raises(ValueError, match="unknown dropping method"):
        ours.encode(px, "random")


def test_llava_prompt_through_our_runner_agrees_with_transformers(tmp_path):
    """Image features at the placeholder positions: prefill logits and 16 greedy tokens.

    Our decoder computes in bfloat16, so the seed is one whose greedy choices all win by more
    than that rounding (checked below, so a change of transformers' init shows as such).
    """
    from edge_infer.backends.torch.backend import TorchBackend
    from edge_infer.generation.runner import Runner
    from edge_infer.models.hf.loader import load_hf_dir
    from edge_infer.vision.preprocess import ImageSpec, preprocess
    from tests.support.vision_images import synthetic
    from tests.support.vision_models import IMAGE_TOKEN, add_tokenizer

    hf = tiny_llava(tmp_path / "vlm", seed=2)
    hf.set_attn_implementation("eager")
    ours = VisionModel.load(tmp_path / "vlm")
    spec = ImageSpec(size={"shortest_edge": 28}, crop=(28, 28))
    px = preprocess(synthetic(41, 57, seed=9), spec)
    enc = ours.encode(px, "full")
    before, after = [5, 17, 42], [60, 61, 99, 7]
    ids = torch.tensor([before + [IMAGE_TOKEN] * enc.total + after])
    pixels = torch.from_numpy(px.values)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits[0, -1].numpy()
        gen = hf.generate(
            input_ids=ids,
            pixel_values=pixels,
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    expected = gen.sequences[0, ids.shape[1] :].tolist()
    margins = [float(torch.topk(step[0], 2).values.diff().abs()) for step in gen.logits]
    assert min(margins) > 0.25

    # the text model from the same directory as the vision side, as users have it
    text = load_hf_dir(add_tokenizer(tmp_path / "vlm", TEMPLATE), bits=16)
    assert text.tokenizer.chat_template == TEMPLATE
    runner = Runner(TorchBackend(text, device="cpu", kv_bits=16), text.tokenizer, 2048)
    cache = runner.new_cache()
    segments = [np.array(before), enc.embeds.numpy(), np.array(after)]
    logits = runner.prefill_segments(segments, cache)
    assert cache.length == ids.shape[1]
    np.testing.assert_allclose(logits, ref, atol=0.1 + 0.01 * np.abs(ref).max())
    tokens = []
    for _ in range(16):
        tokens.append(int(np.argmax(logits)))
        logits = runner.step(tokens[-1], cache)
    assert tokens == expected
    every = runner.prefill_segments(segments, runner.new_cache(), all_logits=True)
    assert every.shape == (ids.shape[1], 272) and int(every[-1].argmax()) == expected[0]


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory):
    from tests.support.vision_models import tiny_llava_next

    path = tmp_path_factory.mktemp("llava_next")
    hf = tiny_llava_next(path)
    hf.set_attn_implementation("eager")
    return path, hf


def next_spec():
    from edge_infer.vision.preprocess import ImageSpec
    from tests.support.vision_models import NEXT_PINPOINTS

    return ImageSpec(
        kind="llava_next",
        size={"shortest_edge": 28},
        crop=(28, 28),
        pinpoints=tuple(tuple(p) for p in NEXT_PINPOINTS),
    )


@pytest.mark.parametrize("hw", [(40, 47), (30, 90), (61, 20), (50, 50)])
def test_llava_next_packed_features_equal_transformers(llava_next, hw):
    """Base view, then the tiles unpadded row by row, each row ending in image_newline."""
    from edge_infer.vision.preprocess import image_token_count, preprocess
    from tests.support.vision_images import synthetic

    path, hf = llava_next
    ours = VisionModel.load(path)
    px = preprocess(synthetic(*hw, seed=hw[0]), next_spec())
    with torch.no_grad():
        ref = hf.model.get_image_features(
            pixel_values=torch.from_numpy(px.values)[None],
            image_sizes=torch.tensor([hw]),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    ref = ref.pooler_output if hasattr(ref, "pooler_output") else ref
    ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
    enc = ours.encode(px, "full")
    assert enc.embeds.shape == ref.shape
    assert enc.total == ref.shape[0] == image_token_count(px, next_spec(), patch=7)
    # float32 sums in another order: features here reach ~10, so 1e-5 relative
    torch.testing.assert_close(enc.embeds, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert torch.equal(ours.encode(px, "hired", Budget(1.0)).embeds, enc.embeds)


def test_llava_next_dropping_keeps_order_and_skips_padding(llava_next):
    from edge_infer.vision.preprocess import preprocess
    from tests.support.vision_images import synthetic

    path, _ = llava_next
    ours = VisionModel.load(path)
    px = preprocess(synthetic(30, 70, seed=3), next_spec())  # 1x3 tiles, columns padded
    assert px.grid == (1, 3)
    valid = ours.valid_tokens(px)
    assert valid[0].all() and not valid[1:].all()
    full = ours.encode(px, "full").embeds
    for method in ("hired", "cls-topk", "uniform"):
        enc = ours.encode(px, method, Budget(0.5))
        # the budget is half of what full passes, not of the padded grid
        assert sum(len(k) for k in enc.kept) == int(valid.sum() * 0.5)
        # every kept tile token is inside the image, and packed tokens appear in full's order
        for v, k in zip(valid[1:], enc.kept[1:], strict=True):
            assert v[k].all()
        tokens = [e for e in enc.embeds if not torch.equal(e, ours.newline)]
        assert len(tokens) == sum(len(k) for k in enc.kept)
        rows = [int(torch.nonzero((full == e).all(dim=1))[0]) for e in tokens]
        assert rows == sorted(rows) and len(set(rows)) == len(rows)


def test_smolvlm_prompt_through_our_runner_agrees_with_transformers(tmp_path):
    """Tiles and the global image between their marker tokens: prefill and 16 greedy tokens
    (a seed whose greedy choices win by more than our bfloat16 decoder's rounding)."""
    from edge_infer.backends.torch.backend import TorchBackend
    from edge_infer.generation.runner import Runner
    from edge_infer.models.hf.loader import load_hf_dir
    from tests.support.vision_models import IMAGE_TOKEN, add_tokenizer

    hf = tiny_idefics3(tmp_path / "vlm", seed=4)
    hf.set_attn_implementation("eager")
    ours = VisionModel.load(tmp_path / "vlm")
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    enc = ours.encode(Pixels(x.numpy(), (64, 64), (2, 2), 4), "full")
    # stand-ins for <fake_token_around_image>, <row_r_col_c> and <global-img>
    pieces: list[list[int]] = [[5, 17]]
    for t in range(5):
        pieces += [[10, 20 + t] if t < 4 else [11, 12], [IMAGE_TOKEN] * 16]
    pieces.append([10, 60, 61, 99, 7])
    ids = torch.tensor([[i for p in pieces for i in p]])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=x[None]).logits[0, -1].numpy()
        gen = hf.generate(
            input_ids=ids,
            pixel_values=x[None],
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    expected = gen.sequences[0, ids.shape[1] :].tolist()
    assert min(float(torch.topk(s[0], 2).values.diff().abs()) for s in gen.logits) > 0.25

    # the text model from the same directory as the vision side, as users have it
    text = load_hf_dir(add_tokenizer(tmp_path / "vlm", TEMPLATE), bits=16)
    assert text.tokenizer.chat_template == TEMPLATE
    runner = Runner(TorchBackend(text, device="cpu", kv_bits=16), text.tokenizer, 2048)
    cache = runner.new_cache()
    feats = enc.embeds.numpy().reshape(5, 16, -1)
    # the placeholder runs are pieces 2, 4, ...: the views in Pixels order (tiles, then global)
    segments = [
        feats[i // 2 - 1] if i % 2 == 0 and 0 < i < 11 else np.array(p)
        for i, p in enumerate(pieces)
    ]
    logits = runner.prefill_segments(segments, cache)
    np.testing.assert_allclose(logits, ref, atol=0.1 + 0.01 * np.abs(ref).max())
    tokens = []
    for _ in range(16):
        tokens.append(int(np.argmax(logits)))
        logits = runner.step(tokens[-1], cache)
    assert tokens == expected


@pytest.mark.parametrize("legacy", [False, True])
def test_llava_mmproj_gives_the_directory_features(llava, tmp_path, legacy):
    """llama.cpp's mmproj of the same weights; old exports drop the last layer and swap the
    FFN's up and down names, which the reader detects from the shapes."""
    from edge_infer.models.gguf.mmproj import read_mmproj
    from tests.support.vision_models import write_mmproj

    path, hf = llava
    gguf = write_mmproj(path, tmp_path / "mmproj.gguf", legacy=legacy)
    assert read_mmproj(gguf).ffn_swapped is legacy
    ours = VisionModel.load(gguf)
    assert ours.spec.tower.layers == ours.spec.layers_run == 2
    x = views(2, 28, seed=6)
    torch.testing.assert_close(ours.features(x), VisionModel.load(path).features(x))
    with torch.no_grad():
        ref = image_features(
            hf.get_image_features(
                pixel_values=x, vision_feature_layer=-2, vision_feature_select_strategy="default"
            )
        )
    # float32 sums in another order (features reach ~10)
    torch.testing.assert_close(ours.features(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    _, ours_scores = ours.run(x, (0, 1))
    _, dir_scores = VisionModel.load(path).run(x, (0, 1))
    torch.testing.assert_close(ours_scores[1], dir_scores[1])


def test_idefics3_mmproj_gives_the_directory_features(idefics3, tmp_path):
    from edge_infer.models.gguf.mmproj import read_mmproj
    from tests.support.vision_models import write_mmproj

    path, _ = idefics3
    gguf = write_mmproj(path, tmp_path / "mmproj.gguf")
    mm = read_mmproj(gguf)
    assert mm.projector == "idefics3" and not mm.ffn_swapped
    assert mm.image_mean == mm.image_std == (0.5, 0.5, 0.5)
    ours, ref = VisionModel.load(gguf), VisionModel.load(path)
    assert ours.spec == dataclasses.replace(ref.spec, image_token_id=-1)
    x = views(3, 32, seed=7)
    torch.testing.assert_close(ours.features(x), ref.features(x))


def image_prompt_logits(text, embeds: np.ndarray, before, after, steps: int = 16):
    """Prefill logits of ``before`` + image + ``after`` and the greedy tokens after them."""
    from edge_infer.backends.torch.backend import TorchBackend
    from edge_infer.generation.runner import Runner

    runner = Runner(TorchBackend(text, device="cpu", kv_bits=16), text.tokenizer, 2048)
    cache = runner.new_cache()
    logits = runner.prefill_segments([np.array(before), embeds, np.array(after)], cache)
    first, tokens = logits, []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits = runner.step(tokens[-1], cache)
    return first, tokens


@pytest.mark.parametrize("arch", ["llava", "llava-legacy", "idefics3"])
def test_text_gguf_and_mmproj_give_the_directory_logits(tmp_path, arch):
    """The same weights as llama.cpp's text GGUF + mmproj and as one HF directory: equal
    image features, prefill logits and 16 greedy tokens (the directory's text model is
    quantized on load as the GGUF's float matrices are, so both run the same numbers)."""
    from edge_infer.models.gguf.loader import load_gguf
    from edge_infer.models.hf.loader import load_hf_dir
    from tests.support.vision_models import add_tokenizer, write_mmproj, write_text_gguf

    vlm = tmp_path / "vlm"
    (tiny_idefics3 if arch == "idefics3" else tiny_llava)(vlm, seed=3)
    add_tokenizer(vlm)
    mmproj = write_mmproj(vlm, tmp_path / "mmproj.gguf", legacy=arch == "llava-legacy")
    side = 32 if arch == "idefics3" else 28
    x = views(1, side, seed=8)
    from_dir = VisionModel.load(vlm).features(x)[0].numpy()
    from_gguf = VisionModel.load(mmproj).features(x)[0].numpy()
    np.testing.assert_allclose(from_gguf, from_dir, rtol=1e-6, atol=1e-6)

    text_dir = load_hf_dir(vlm)
    text_gguf = load_gguf(write_text_gguf(vlm, tmp_path / "text.gguf"))
    assert text_gguf.config.vocab_size == text_dir.config.vocab_size == 272
    before, after = [5, 17, 42], [60, 61, 99, 7]
    ref, ref_tokens = image_prompt_logits(text_dir, from_dir, before, after)
    got, tokens = image_prompt_logits(text_gguf, from_gguf, before, after)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert tokens == ref_tokens and len(set(tokens)) > 1


@pytest.mark.parametrize("legacy, layer", [(False, -2), (True, -2), (False, 1)])
def test_llava_next_text_gguf_and_mmproj_give_the_directory_logits(tmp_path, legacy, layer):
    """LLaVA-NeXT as llama.cpp's text GGUF + mmproj (pinpoints, spatial_unpad, image_newline,
    a feature layer) and as one HF directory: the same spec, packed features as transformers',
    HiRED's choices, prefill logits and 16 greedy tokens."""
    from edge_infer.models.gguf.loader import load_gguf
    from edge_infer.models.hf.loader import load_hf_dir
    from edge_infer.vision.preprocess import preprocess
    from tests.support.vision_images import synthetic
    from tests.support.vision_models import (
        add_tokenizer,
        tiny_llava_next,
        write_mmproj,
        write_text_gguf,
    )

    vlm = tmp_path / "vlm"
    hf = tiny_llava_next(vlm, seed=4, feature_layer=layer)
    hf.set_attn_implementation("eager")
    add_tokenizer(vlm)
    mmproj = write_mmproj(vlm, tmp_path / "mmproj.gguf", legacy=legacy)
    ours, ref = VisionModel.load(mmproj), VisionModel.load(vlm)
    assert ours.spec.arch == "llava_next" and ours.spec.pinpoints == ref.spec.pinpoints
    assert ours.spec.layers_run == ref.spec.layers_run == (2 if layer == -2 else 1)
    torch.testing.assert_close(ours.newline, ref.newline, rtol=0, atol=0)

    px = preprocess(synthetic(30, 70, seed=5), next_spec())  # 1x3 tiles, columns padded
    got, want = ours.encode(px, "full").embeds, ref.encode(px, "full").embeds
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        hf_feats = hf.model.get_image_features(
            pixel_values=torch.from_numpy(px.values)[None],
            image_sizes=torch.tensor([px.image_hw]),
            vision_feature_layer=layer,
            vision_feature_select_strategy="default",
        )
    hf_feats = getattr(hf_feats, "pooler_output", hf_feats)
    hf_feats = torch.cat(list(hf_feats)) if isinstance(hf_feats, (list, tuple)) else hf_feats
    torch.testing.assert_close(got, hf_feats, rtol=1e-5, atol=1e-5 * float(hf_feats.abs().max()))
    hired, hired_dir = ours.encode(px, "hired", Budget(0.2)), ref.encode(px, "hired", Budget(0.2))
    assert [k.tolist() for k in hired.kept] == [k.tolist() for k in hired_dir.kept]

    text_dir = load_hf_dir(vlm)
    text_gguf = load_gguf(write_text_gguf(vlm, tmp_path / "text.gguf"))
    before, after = [5, 17, 42], [60, 61, 99, 7]
    ref_logits, ref_tokens = image_prompt_logits(text_dir, want.numpy(), before, after)
    logits, tokens = image_prompt_logits(text_gguf, got.numpy(), before, after)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    assert tokens == ref_tokens and len(set(tokens)) > 1
