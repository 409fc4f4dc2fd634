"""What an agent holds: reusing the ids it generated when its conversation is rendered again."""

from __future__ import annotations

from edge_infer.agents.state import reuse_cached_spelling

# a toy vocabulary: ids spell these bytes
SPELL = {1: b"<s>", 2: b'"}', 3: b"}", 4: b'"}}', 5: b"\n", 6: b"x", 7: b"</s>"}


def spell(t: int) -> bytes:
    return SPELL[t]


def test_generated_ids_are_kept_where_they_spell_the_same_text():
    cached = [1, 6, 2, 3]  # the model wrote '"}' then '}'
    rendered = [1, 6, 4, 7, 5, 6]  # the tokenizer writes '"}}' in one token
    assert reuse_cached_spelling(cached, rendered, spell) == [1, 6, 2, 3, 7, 5, 6]


def test_a_cache_that_spells_something_else_is_reused_up_to_the_difference():
    assert reuse_cached_spelling([1, 6, 6], [1, 6, 4, 7], spell) == [1, 6, 4, 7]
    assert reuse_cached_spelling([1, 2, 3, 6], [1, 4, 7], spell) == [1, 2, 3, 7]
    # the cache ends inside a rendered token: reused up to the last shared boundary
    assert reuse_cached_spelling([1, 6, 2], [1, 6, 4, 7], spell) == [1, 6, 4, 7]
    assert reuse_cached_spelling([1, 2, 3, 2], [1, 4, 4, 7], spell) == [1, 2, 3, 4, 7]


def test_a_cache_that_is_a_prefix_changes_nothing():
    assert reuse_cached_spelling([1, 6], [1, 6, 4], spell) == [1, 6, 4]
    assert reuse_cached_spelling([], [1], spell) == [1]
