"""Settings: byte sizes as users write them."""

from __future__ import annotations

import pytest

from edge_infer.config import parse_bytes


@pytest.mark.parametrize(
    ("text", "n"),
    [("256MB", 256 << 20), ("1.5 GiB", 3 << 29), ("4096", 4096), (1000, 1000), ("2g", 2 << 30)],
)
def test_sizes(text, n):
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "-1MB", "", "MB"])
def test_bad_sizes_name_the_setting(text):
    with pytest.raises(ValueError, match="kv_memory"):
        parse_bytes(text, "kv_memory")
