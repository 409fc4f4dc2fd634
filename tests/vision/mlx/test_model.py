"""Our MLX towers and projectors against the torch ones and transformers (fp32) on tiny VLMs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.support.vision_models import tiny_idefics3, tiny_llava, tiny_llava_next, write_mmproj

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edge_infer.vision.mlx.model import VisionModel  # noqa: E402
from edge_infer.vision.torch.model import VisionModel as TorchVisionModel  # noqa: E402

BUILDERS = {
    "llava": (tiny_llava, 28),
    "llava_next": (tiny_llava_next, 28),
    "idefics3": (tiny_idefics3, 32),
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def vlm(request, tmp_path_factory):
    build, side = BUILDERS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = build(path)
    hf.set_attn_implementation("eager")
    return request.param, path, hf, side


def views(n: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, side, side)).astype(np.float32)


def close(got, ref, rel: float = 1e-5) -> None:
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=rel, atol=rel * float(np.abs(ref).max()))


def test_features_and_scores_equal_the_torch_tower(vlm):
    arch, path, _, side = vlm
    ours, ref = VisionModel.load(path), TorchVisionModel.load(path)
    assert ours.spec == ref.spec
    x = views(3, side, seed=1)
    close(ours.features(mx.array(x)), ref.features(torch.from_numpy(x)))
    layers = (0, ours.spec.layers_run - 1)
    _, got = ours.run(mx.array(x), layers)
    _, want = ref.run(torch.from_numpy(x), layers)
    for layer in layers:
        close(got[layer], want[layer])
    if arch == "llava_next":
        close(ours.w["newline"], ref.newline)


def test_features_equal_transformers(vlm):
    arch, path, hf, side = vlm
    ours = VisionModel.load(path)
    x = views(2, side, seed=2)
    with torch.no_grad():
        if arch == "idefics3":
            out = hf.get_image_features(pixel_values=torch.from_numpy(x)[None])
        else:
            out = hf.model.vision_tower(pixel_values=torch.from_numpy(x), output_hidden_states=True)
            out = hf.model.multi_modal_projector(out.hidden_states[-2][:, 1:])
    out = out.pooler_output if hasattr(out, "pooler_output") else out
    close(ours.features(mx.array(x)), np.asarray(out).reshape(2, 16, 64))


def test_cls_and_received_scores_equal_transformers_attentions(vlm):
    arch, path, hf, side = vlm
    ours = VisionModel.load(path)
    x = views(2, side, seed=3)
    with torch.no_grad():
        if arch == "idefics3":
            mask = torch.ones(2, 8, 8, dtype=torch.bool)
            att = hf.model.vision_model(
                pixel_values=torch.from_numpy(x), patch_attention_mask=mask, output_attentions=True
            ).attentions
        else:
            att = hf.model.vision_tower(
                pixel_values=torch.from_numpy(x), output_attentions=True
            ).attentions
    _, got = ours.run(mx.array(x), (0, 1))
    for layer in (0, 1):
        a = att[layer]
        want = a.mean(dim=(1, 2)) if arch == "idefics3" else a[:, :, 0, 1:].sum(dim=1)
        close(got[layer], want.numpy(), rel=1e-4)


def test_idefics3_positions_of_a_smaller_view_equal_the_torch_tower(tmp_path):
    path = tmp_path / "vlm"
    tiny_idefics3(path)
    ours, ref = VisionModel.load(path), TorchVisionModel.load(path)
    x = views(1, 32, seed=4)[:, :, :24, :16]  # a 6 x 4 patch grid: bucketed positions
    hidden, _ = ours.run(mx.array(x))
    want, _ = ref.run(torch.from_numpy(np.ascontiguousarray(x)))
    close(hidden, want.numpy())


@pytest.mark.parametrize("legacy", [False, True])
def test_mmproj_loads_the_same_tower(tmp_path, legacy):
    path = tmp_path / "vlm"
    tiny_llava(path)
    gguf = write_mmproj(path, tmp_path / "mmproj.gguf", legacy=legacy)
    x = mx.array(views(2, 28, seed=5))
    close(VisionModel.load(gguf).features(x), VisionModel.load(path).features(x), rel=1e-6)


def image_pixels(arch: str, seed: int = 6):
    """A synthetic image preprocessed for ``arch`` (tiles for LLaVA-NeXT and Idefics3)."""
    from edge_infer.vision.preprocess import ImageSpec, Pixels, preprocess
    from tests.support.vision_images import synthetic
    from tests.support.vision_models import NEXT_PINPOINTS

    if arch == "idefics3":
        x = views(7, 32, seed)
        return Pixels(x, (64, 96), (2, 3), 6)
    if arch == "llava_next":
        spec = ImageSpec(
            kind="llava_next",
            size={"shortest_edge": 28},
            crop=(28, 28),
            pinpoints=tuple(tuple(p) for p in NEXT_PINPOINTS),
        )
        return preprocess(synthetic(30, 70, seed=seed), spec)
    return preprocess(
        synthetic(41, 57, seed=seed), ImageSpec(size={"shortest_edge": 28}, crop=(28, 28))
    )


@pytest.mark.parametrize(
    "method, rate",
    [("full", 1.0), ("hired", 1.0), ("hired", 0.2), ("uniform", 0.2), ("cls-topk", 0.2)],
)
def test_encode_keeps_what_the_torch_tower_keeps(vlm, method, rate):
    from edge_infer.vision.dropping import Budget

    arch, path, _, _ = vlm
    ours, ref = VisionModel.load(path), TorchVisionModel.load(path)
    px = image_pixels(arch)
    got, want = ours.encode(px, method, Budget(rate)), ref.encode(px, method, Budget(rate))
    assert (got.total, got.skipped) == (want.total, want.skipped)
    assert [k.tolist() for k in got.kept] == [k.tolist() for k in want.kept]
    close(got.embeds, want.embeds.numpy())
    if rate == 1.0:
        np.testing.assert_array_equal(
            np.asarray(got.embeds), np.asarray(ours.encode(px, "full").embeds)
        )


@pytest.mark.parametrize("arch", ["llava", "llava_next", "idefics3"])
def test_image_prompt_through_mlx_agrees_with_transformers(tmp_path, arch):
    """MLX tower, projector and decoder (float32) from one HF directory: prefill logits and
    16 greedy tokens of an image prompt equal transformers' full VLM forward."""
    from edge_infer.backends.mlx.backend import MLXBackend
    from edge_infer.generation.runner import Runner
    from edge_infer.models.hf.loader import load_hf_dir
    from tests.support.vision_models import IMAGE_TOKEN, add_tokenizer

    build, _ = BUILDERS[arch]
    hf = build(tmp_path, seed=2 if arch == "llava" else 4)
    hf.set_attn_implementation("eager")
    add_tokenizer(tmp_path)
    px = image_pixels(arch, seed=9)
    enc = VisionModel.load(tmp_path).encode(px, "full")
    before, after = [5, 17, 42], [60, 61, 99, 7]
    ids = torch.tensor([before + [IMAGE_TOKEN] * enc.total + after])
    pixels = torch.from_numpy(px.values)
    extra = {}
    if arch == "idefics3":
        pixels = pixels[None]
    elif arch == "llava_next":
        pixels, extra = pixels[None], {"image_sizes": torch.tensor([px.image_hw])}
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, **extra).logits[0, -1].numpy()
        gen = hf.generate(
            input_ids=ids,
            pixel_values=pixels,
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            **extra,
        )
    expected = gen[0, ids.shape[1] :].tolist()

    text = load_hf_dir(tmp_path, bits=16)
    backend = MLXBackend(text, dtype="float32", kv_bits=16)
    runner = Runner(backend, text.tokenizer, 2048)
    cache = runner.new_cache()
    segments = [np.array(before), np.array(enc.embeds), np.array(after)]
    logits = runner.prefill_segments(segments, cache)
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    tokens = []
    for _ in range(16):
        tokens.append(int(np.argmax(logits)))
        logits = runner.step(tokens[-1], cache)
    assert tokens == expected


def test_mlx_vlm_directory_with_channels_last_patch_kernel_loads_the_same(vlm, tmp_path):
    """mlx-vlm's converted directories keep the patch convolution as [out, p, p, 3]."""
    from safetensors.numpy import load_file, save_file

    arch, path, _, side = vlm
    tensors = load_file(str(path / "model.safetensors"))
    for k in tensors:
        if k.endswith("patch_embedding.weight"):
            tensors[k] = np.ascontiguousarray(tensors[k].transpose(0, 2, 3, 1))
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    x = views(2, side, seed=10)
    close(
        VisionModel.load(tmp_path).features(mx.array(x)),
        VisionModel.load(path).features(mx.array(x)),
        rel=1e-6,
    )
    ref = TorchVisionModel.load(path).features(torch.from_numpy(x))
    torch.testing.assert_close(TorchVisionModel.load(tmp_path).features(torch.from_numpy(x)), ref)


@pytest.mark.parametrize("legacy, layer", [(False, -2), (True, 1)])
def test_llava_next_text_gguf_and_mmproj_give_the_directory_logits(tmp_path, legacy, layer):
    """LLaVA-NeXT on MLX from llama.cpp's text GGUF + mmproj and from the HF directory: the
    same packed features (with image_newline), prefill logits and 16 greedy tokens."""
    from edge_infer.backends.mlx.backend import MLXBackend
    from edge_infer.generation.runner import Runner
    from edge_infer.models.gguf.loader import load_gguf
    from edge_infer.models.hf.loader import load_hf_dir
    from tests.support.vision_models import add_tokenizer, write_text_gguf

    vlm = tmp_path / "vlm"
    tiny_llava_next(vlm, seed=4, feature_layer=layer)
    add_tokenizer(vlm)
    mmproj = write_mmproj(vlm, tmp_path / "mmproj.gguf", legacy=legacy)
    ours, ref = VisionModel.load(mmproj), VisionModel.load(vlm)
    assert ours.spec.arch == "llava_next" and ours.spec.layers_run == ref.spec.layers_run
    px = image_pixels("llava_next", seed=9)
    got, want = ours.encode(px, "full").embeds, ref.encode(px, "full").embeds
    close(got, want, rel=1e-6)
    torch_got = TorchVisionModel.load(mmproj).encode(px, "full").embeds.numpy()
    close(got, torch_got)

    def prompt(text, embeds):
        runner = Runner(MLXBackend(text, dtype="float32", kv_bits=16), text.tokenizer, 2048)
        cache = runner.new_cache()
        segments = [np.array([5, 17, 42]), np.array(embeds), np.array([60, 61, 99, 7])]
        logits = first = runner.prefill_segments(segments, cache)
        tokens = []
        for _ in range(16):
            tokens.append(int(np.argmax(logits)))
            logits = runner.step(tokens[-1], cache)
        return first, tokens

    ref_logits, ref_tokens = prompt(load_hf_dir(vlm), want)
    logits, tokens = prompt(load_gguf(write_text_gguf(vlm, tmp_path / "text.gguf")), got)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    assert tokens == ref_tokens and len(set(tokens)) > 1
