"""The engine with a VLM on either backend: images in chats (the tower runs on the backend's
framework), dropping settings, usage, tools, restore in a new process, text-only refusal."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("transformers")

from edge_infer.engine import Engine  # noqa: E402
from tests.support.image_agent_script import image_agent_turns  # noqa: E402
from tests.support.vision_images import synthetic  # noqa: E402
from tests.support.vision_models import llava_user_dir  # noqa: E402


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A tiny random LLaVA-1.5 directory as users have it, and transformers' model of it."""
    path = tmp_path_factory.mktemp("vlm")
    hf = llava_user_dir(path)
    hf.set_attn_implementation("eager")
    return path, hf


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def messages(image_part) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi "},
                image_part,
                {"type": "text", "text": " what?"},
            ],
        }
    ]


def test_image_chat_matches_transformers_greedy(llava):
    import torch

    from edge_infer.backends.torch.backend import TorchBackend
    from edge_infer.engine import Vision
    from edge_infer.models.hf.loader import load_hf_dir
    from edge_infer.vision.preprocess import ImageSpec
    from edge_infer.vision.torch.model import VisionModel

    path, hf = llava
    text = load_hf_dir(path, bits=16)  # unquantised, to compare with transformers
    vision = Vision(VisionModel.load(path), ImageSpec.from_dir(path), "full")
    eng = Engine(text, TorchBackend(text, device="cpu", kv_bits=16), vision=vision)
    img = synthetic(41, 57, seed=9)
    msgs = messages({"type": "image", "image": img})
    prompt = eng.image_chat(msgs)
    assert prompt.image_tokens == prompt.image_tokens_total == 16
    assert prompt.ids.count(271) == 16
    ids = torch.tensor([prompt.ids])
    from edge_infer.vision.preprocess import preprocess

    pixels = torch.from_numpy(preprocess(img, eng.vision.image_spec).values)
    with torch.no_grad():
        gen = hf.generate(
            input_ids=ids,
            pixel_values=pixels,
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    expected = gen.sequences[0, ids.shape[1] :].tolist()
    margins = [float(torch.topk(s[0], 2).values.diff().abs()) for s in gen.logits]
    got = [t for t, _ in eng.generate_image_tokens(prompt, max_tokens=4, temperature=0.0)]
    got = [t for t in got if t is not None]
    if min(margins) > 0.25:  # our decoder computes in bfloat16
        assert got == expected
    else:
        assert got[0] == expected[0]


def test_data_uri_budget_and_usage(llava):
    path, _ = llava
    eng = Engine.load(path, "torch", kv_bits=16)  # hired at r=0.2 by default
    uri = "data:image/png;base64," + base64.b64encode(png(synthetic(30, 30, seed=1))).decode()
    msgs = messages({"type": "image_url", "image_url": {"url": uri}})
    eng.chat(msgs, max_tokens=3, temperature=0.0)
    u = eng.last_usage
    assert (u.image_tokens, u.image_tokens_total) == (3, 16)  # floor(16 * 0.2)
    assert u.cached_tokens == 0 and u.completion_tokens >= 1
    eng.chat(msgs, max_tokens=3, temperature=0.0, visual_budget=0.5)
    assert eng.last_usage.image_tokens == 8
    assert eng.last_usage.prompt_tokens == u.prompt_tokens + 5


def test_image_path_part(llava, tmp_path):
    path, _ = llava
    eng = Engine.load(path, "torch", kv_bits=16, visual_budget=1.0)
    f = tmp_path / "pic.png"
    synthetic(20, 33, seed=3).save(f)
    eng.chat(messages({"type": "image_url", "image_url": {"url": str(f)}}), max_tokens=2)
    assert eng.last_usage.image_tokens == 16


def test_text_only_model_refuses_images():
    eng = Engine.load(None, "torch")
    with pytest.raises(ValueError, match="text-only model takes no images"):
        eng.chat(messages({"type": "image", "image": synthetic(8, 8)}), max_tokens=1)
    assert eng.vision is None


def test_unknown_visual_method_is_refused(llava):
    with pytest.raises(ValueError, match="visual method"):
        Engine.load(llava[0], "torch", visual_method="nope")


def test_prompt_ends_in_text():
    from edge_infer.engine import ImagePrompt

    p = ImagePrompt()
    p.add_ids([1, 2])
    p.add_embeds(np.zeros((2, 4), np.float32), 9)
    p.add_ids([3])
    assert p.ids == [1, 2, 9, 9, 3]
    assert [len(s) for s in p.segments_before_last()] == [2, 2]


def test_llava_next_text_gguf_with_mmproj_answers_as_its_directory(tmp_path):
    """llama.cpp's text GGUF + LLaVA-NeXT mmproj through Engine.load and an agent's chat:
    anyres tiles from the mmproj's pinpoints, and the reply the same weights give as one HF
    directory with the same preprocessing."""

    from edge_infer.engine import mmproj_image_spec
    from edge_infer.vision.preprocess import image_token_count, preprocess
    from tests.support.vision_models import (
        NEXT_PINPOINTS,
        add_tokenizer,
        tiny_llava_next,
        write_mmproj,
        write_text_gguf,
    )

    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    vlm = tmp_path / "vlm"
    tiny_llava_next(vlm, seed=4)
    add_tokenizer(vlm, template)
    (vlm / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "LlavaNextImageProcessor",
                "size": {"shortest_edge": 28},
                "crop_size": {"height": 28, "width": 28},
                "image_grid_pinpoints": NEXT_PINPOINTS,
                "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5],
            }
        )
    )
    mmproj = write_mmproj(vlm, tmp_path / "mmproj.gguf")
    text = write_text_gguf(vlm, tmp_path / "text.gguf", template)
    spec = mmproj_image_spec(mmproj)
    assert spec.kind == "llava_next" and spec.crop == (28, 28)
    assert spec.pinpoints == tuple(tuple(p) for p in NEXT_PINPOINTS)
    picture = tmp_path / "wide.png"
    synthetic(30, 70, seed=5).save(picture)
    px = preprocess(picture, spec)
    assert px.grid == (1, 3)
    total = image_token_count(px, spec, patch=7)

    replies = []
    for model, extra in ((text, {"mmproj": mmproj}), (vlm, {})):
        eng = Engine.load(model, "torch", kv_bits=16, visual_budget=1.0, **extra)
        agent = eng.agent("viewer")
        reply = agent.chat("What is in it?", images=[picture], max_tokens=6, temperature=0.0)
        assert (agent.usage.image_tokens, agent.usage.image_tokens_total) == (total, total)
        replies.append(reply)
    assert replies[0] == replies[1] and replies[0]


def greedy_reference(hf, prompt, pixels, n: int):
    """transformers' greedy tokens after ``prompt`` and the margin of its closest choice."""
    import torch

    ids = torch.tensor([prompt.ids])
    with torch.no_grad():
        gen = hf.generate(
            input_ids=ids,
            pixel_values=torch.from_numpy(pixels),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    margin = min(float(torch.topk(s[0], 2).values.diff().abs()) for s in gen.logits)
    return gen.sequences[0, ids.shape[1] :].tolist(), margin


def test_image_chat_on_mlx_matches_transformers_greedy(llava):
    """The MLX tower feeding the MLX decoder (float32) through the engine: the same image
    tokens as the torch engine's prompt, and transformers' 16 greedy tokens."""
    pytest.importorskip("mlx.core")
    from edge_infer.backends.mlx.backend import MLXBackend
    from edge_infer.engine import Vision
    from edge_infer.models.hf.loader import load_hf_dir
    from edge_infer.vision.preprocess import ImageSpec, preprocess
    from edge_infer.vision.tower import load_tower

    path, hf = llava
    text = load_hf_dir(path, bits=16)
    vision = Vision(load_tower(path, "mlx"), ImageSpec.from_dir(path), "full")
    eng = Engine(text, MLXBackend(text, dtype="float32", kv_bits=16), vision=vision)
    img = synthetic(41, 57, seed=9)
    msgs = messages({"type": "image", "image": img})
    prompt = eng.image_chat(msgs)
    assert prompt.image_tokens == prompt.image_tokens_total == 16
    torch_vision = Vision(load_tower(path, "torch"), ImageSpec.from_dir(path), "full")
    assert prompt.ids == Engine(text, eng.backend, vision=torch_vision).image_chat(msgs).ids
    expected, _ = greedy_reference(hf, prompt, preprocess(img, vision.image_spec).values, 16)
    got = [t for t, _ in eng.generate_image_tokens(prompt, max_tokens=16, temperature=0.0)]
    assert [t for t in got if t is not None] == expected
    assert eng.last_usage.image_tokens == 16


def test_load_runs_the_tower_on_the_backends_framework(llava):
    """``Engine.load(..., backend)`` picks the tower of the backend's framework; both keep the
    same tokens of an image and give it the same embeddings."""
    pytest.importorskip("mlx.core")
    from edge_infer.vision.mlx.model import VisionModel as MLXVisionModel
    from edge_infer.vision.torch.model import VisionModel as TorchVisionModel
    from edge_infer.vision.tower import VisionTower

    path, _ = llava
    on_mlx = Engine.load(path, "mlx", kv_bits=16)  # hired at r=0.2 by default
    on_torch = Engine.load(path, "torch", kv_bits=16)
    assert on_mlx.vision is not None and on_torch.vision is not None
    assert isinstance(on_mlx.vision.model, MLXVisionModel)
    assert isinstance(on_torch.vision.model, TorchVisionModel)
    assert isinstance(on_mlx.vision.model, VisionTower)
    img = synthetic(33, 47, seed=4)
    msgs = messages({"type": "image", "image": img})
    a, b = on_mlx.image_chat(msgs), on_torch.image_chat(msgs)
    assert a.ids == b.ids and a.images == b.images
    assert (a.image_tokens, a.image_tokens_total) == (b.image_tokens, b.image_tokens_total)
    assert a.image_tokens == 3  # floor(16 * 0.2)
    (ea,), (eb,) = [s for s in a.segments if s.ndim == 2], [s for s in b.segments if s.ndim == 2]
    assert ea.dtype == eb.dtype == np.float32
    np.testing.assert_allclose(ea, eb, rtol=1e-4, atol=1e-4 * float(np.abs(eb).max()))
    on_mlx.chat(msgs, max_tokens=3, temperature=0.0)
    assert (on_mlx.last_usage.image_tokens, on_mlx.last_usage.image_tokens_total) == (3, 16)


def test_mmproj_runs_on_the_backends_framework(llava, tmp_path):
    """A text GGUF with its mmproj file: the MLX engine's tower is the MLX one, and it reads
    the image as the torch engine does."""
    pytest.importorskip("mlx.core")
    pytest.importorskip("gguf")
    from edge_infer.vision.mlx.model import VisionModel as MLXVisionModel
    from tests.support.vision_models import write_mmproj, write_text_gguf

    path, _ = llava
    text = write_text_gguf(path, tmp_path / "text.gguf")
    mm = write_mmproj(path, tmp_path / "mm.gguf")
    kw = dict(mmproj=mm, kv_bits=16, visual_method="full")
    on_mlx, on_torch = Engine.load(text, "mlx", **kw), Engine.load(text, "torch", **kw)
    assert on_mlx.vision is not None and isinstance(on_mlx.vision.model, MLXVisionModel)
    msgs = messages({"type": "image", "image": synthetic(41, 57, seed=9)})
    assert on_mlx.image_chat(msgs).ids == on_torch.image_chat(msgs).ids
    on_mlx.chat(msgs, max_tokens=2, temperature=0.0)
    assert on_mlx.last_usage.image_tokens == on_mlx.last_usage.image_tokens_total == 16


def test_tools_are_rendered_with_images(llava):
    from edge_infer.generation.tools import parse_tools

    path, _ = llava
    eng = Engine.load(path, "torch", kv_bits=16, visual_method="full")
    tools = parse_tools(
        [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}]
    )
    msgs = messages({"type": "image", "image": synthetic(20, 20, seed=2)})
    plain, with_tools = eng.image_chat(msgs), eng.image_chat(msgs, tools=tools)
    # this template renders no tools: they go in a system turn, as for a text-only chat
    listing = eng.runner.render_chat([{"role": "user", "content": "x"}], tools=tools)
    assert "look" in listing and "look" in eng.detokenize(with_tools.ids)
    assert "look" not in eng.detokenize(plain.ids)
    assert with_tools.image_tokens == plain.image_tokens == 16
    assert with_tools.ids.count(271) == plain.ids.count(271) == 16


def test_mlx_agent_with_an_image_restores_in_a_new_process_token_identically(llava, tmp_path):
    pytest.importorskip("mlx.core")
    path, _ = llava
    pic = tmp_path / "pic.png"
    synthetic(41, 57, seed=9).save(pic)
    first = image_agent_turns(path, "mlx", tmp_path / "a", "iris", pic, "what is it?")
    restored = image_agent_turns(path, "mlx", tmp_path / "a", "iris", "-", "and then?")
    continued = image_agent_turns(
        path, "mlx", tmp_path / "b", "iris", pic, "what is it?", "and then?"
    )
    assert first[0]["image"] == 16 and first[0]["cached"] == 0
    assert first[0]["reply"] == continued[0]["reply"]
    assert restored[0]["ids"] == continued[1]["ids"]
    assert restored[0]["reply"] == continued[1]["reply"]
    # the new process read the image's KV from disk: only the new turn was prefilled
    assert restored[0]["cached"] >= first[0]["prompt"]
    assert restored[0]["cached"] == continued[1]["cached"]
