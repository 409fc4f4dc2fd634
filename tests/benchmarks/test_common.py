"""The passkey prompt builder puts the key where it is asked to."""

import pytest

from benchmarks.common import PASSKEY_QUESTION, passkey_prompt

BOS = 1


def encode(text: str, add_bos: bool | None = None) -> list[int]:
    """A character-level tokenizer: every position of the prompt is one character."""
    return ([BOS] if add_bos is not False else []) + [ord(c) for c in text]


def text(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids if i != BOS)


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_the_key_sits_at_the_asked_depth(depth):
    p = passkey_prompt(encode, 4096, depth, 73519, align=64)
    ids = p.ids
    assert len(ids) == 4096
    assert ids.count(BOS) == 1 and ids[0] == BOS
    start = len(p.before)
    assert start % 64 == 0
    assert ids[start : start + len(p.needle)] == p.needle
    assert abs(start / len(ids) - depth) < 0.03
    assert "73519" in text(p.needle)
    assert "73519" not in text(p.before) + text(p.after)
    assert text(ids).endswith(PASSKEY_QUESTION)


def test_keys_at_one_depth_share_everything_before_the_key():
    a = passkey_prompt(encode, 2048, 0.5, 10000, align=64)
    b = passkey_prompt(encode, 2048, 0.5, 99999, align=64)
    assert a.before == b.before
    assert a.needle != b.needle
    assert len(a.ids) == len(b.ids)


def test_a_prompt_too_short_for_filler_is_refused():
    with pytest.raises(ValueError, match="no room"):
        passkey_prompt(encode, 100, 0.5, 12345, align=64)
