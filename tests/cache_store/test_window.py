"""Which blocks a sliding window still sees, and the hidden parts held until released."""

from __future__ import annotations

import numpy as np
import pytest

from edge_infer.cache_store.kv_format import QuantizedKV
from edge_infer.cache_store.window import HiddenParts, cut_needs_released, unseen_before


def part(tokens: int = 8) -> QuantizedKV:
    return QuantizedKV(
        packed=np.zeros((1, tokens, 8), dtype=np.uint32),
        scales=np.zeros((1, tokens, 1), dtype=np.float16),
        biases=np.zeros((1, tokens, 1), dtype=np.float16),
        group_size=64,
    )


@pytest.mark.parametrize(
    ("length", "window", "expected"),
    [(0, 10, 0), (9, 10, 0), (17, 10, 8), (25, 10, 16), (120, 10, 104), (120, 200, 0)],
)
def test_unseen_before_is_the_block_holding_the_oldest_visible_token(length, window, expected):
    assert unseen_before(length, window, 8) == expected
    # brute force: the first block any query at length.. sees
    oldest = max(0, length - window + 1)
    assert expected <= oldest < expected + 8


def test_hidden_parts_come_back_once_and_release_for_good():
    hidden = HiddenParts(8)
    keys, values = part(), part()
    hidden.put(0, 2, (keys, values))
    hidden.put(8, 2, (part(), part()))
    hidden.put(8, 3, (part(), part()))
    assert hidden.get(0, 2, 0) is keys and hidden.get(0, 2, 1) is values
    one = keys.nbytes + values.nbytes
    assert hidden.nbytes == 3 * one
    hidden.drop(8, 3)  # moved back into layer 3's buffers
    with pytest.raises(ValueError, match="layer 3 no longer holds tokens 8..16"):
        hidden.get(8, 3, 0)
    assert hidden.release(8) == one and hidden.released == 8
    with pytest.raises(ValueError, match="released"):
        hidden.get(0, 2, 0)
    hidden.cut(4)  # a truncation before the released blocks ends them too
    assert hidden.released == 4 and hidden.nbytes == 0


def test_a_cut_needs_released_blocks_only_when_a_bounded_window_reaches_them():
    # window 300, blocks of 256: a cut to 900 tokens (768 sealed) sees from block 512 on
    assert not cut_needs_released(900, 768, [300], [768], released=512, block_size=256)
    # cut further back to 600: the window sees block 256 again, which the buffers no longer
    # hold (they start at 768) and which was released
    assert cut_needs_released(600, 512, [300], [768], released=512, block_size=256)
    # the same cut when nothing was released, or when the buffers still hold block 256
    assert not cut_needs_released(600, 512, [300], [768], released=0, block_size=256)
    assert not cut_needs_released(600, 512, [300], [256], released=512, block_size=256)
    # global (or unbounded) layers never need released blocks
    assert not cut_needs_released(600, 512, [0, 0], [768, 768], released=512, block_size=256)
