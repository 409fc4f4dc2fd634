"""Agents with images: persisted and restored like any other; KV reused only for the same image."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("transformers")

from edge_infer.agents.images import ImagePrompt  # noqa: E402
from tests.support.image_agent_script import image_agent_turns  # noqa: E402
from tests.support.vision_images import synthetic  # noqa: E402
from tests.support.vision_models import llava_user_dir  # noqa: E402


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    path = tmp_path_factory.mktemp("vlm")
    llava_user_dir(path)
    return path


def test_agent_with_an_image_restores_in_a_new_process_token_identically(vlm, tmp_path):
    pic = tmp_path / "pic.png"
    synthetic(41, 57, seed=9).save(pic)
    first = image_agent_turns(vlm, "torch", tmp_path / "a", "alice", pic, "what is it?")
    restored = image_agent_turns(vlm, "torch", tmp_path / "a", "alice", "-", "and then?")
    continued = image_agent_turns(
        vlm, "torch", tmp_path / "b", "alice", pic, "what is it?", "and then?"
    )
    assert first[0]["image"] == 16 and first[0]["cached"] == 0
    assert first[0]["reply"] == continued[0]["reply"]
    assert restored[0]["reply"] == continued[1]["reply"]
    # the new process reused the image's KV: only the new turn was prefilled
    assert restored[0]["cached"] >= first[0]["prompt"]
    assert restored[0]["cached"] == continued[1]["cached"]


def test_a_different_image_at_the_same_position_does_not_reuse_its_kv(vlm, tmp_path, monkeypatch):
    from edge_infer.engine import Engine

    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path / "cache"))
    eng = Engine.load(vlm, "torch", kv_bits=16, visual_method="full")
    agent = eng.agent("bob")
    one, two = synthetic(30, 40, seed=1), synthetic(30, 40, seed=2)
    greedy = dict(max_tokens=2, temperature=0.0)

    def ask(image) -> int:
        msg = [{"type": "image", "image": image}, {"type": "text", "text": " what?"}]
        turn = agent.start_turn([{"role": "user", "content": msg}], keep_messages=0, **greedy)
        "".join(turn.stream())  # the stream finishes the turn
        return turn.usage.cached_tokens

    ask(one)
    parts = [{"type": "image", "image": one}, {"type": "text", "text": " what?"}]
    span_start, span_end, _ = eng.image_chat([{"role": "user", "content": parts}]).images[0]
    assert ask(two) <= span_start  # cut back to the image's start
    assert ask(two) >= span_end  # the same image again: its KV is reused
    assert ask(one) <= span_start


def test_reusable_cuts_back_to_a_changed_or_partly_held_image():
    p = ImagePrompt()
    p.add_ids([1, 2])
    p.add_embeds(np.zeros((3, 4), np.float32), 9)
    p.add_ids([3, 4])
    p.images.append((2, 5, "k"))
    assert p.reusable([[2, 5, "k"]], 6) == 6
    assert p.reusable([[2, 5, "other"]], 6) == 2
    assert p.reusable([], 4) == 2
    assert [len(s) for s in p.segments_from(3)] == [2, 1]
