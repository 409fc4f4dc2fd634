"""Both frameworks' image sides keep the one contract the engine calls, loaded by name."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from edge_infer.vision.dropping import Budget  # noqa: E402
from edge_infer.vision.preprocess import Pixels  # noqa: E402
from edge_infer.vision.tower import EncodedImage, VisionTower, load_tower  # noqa: E402
from tests.support.vision_models import tiny_llava  # noqa: E402


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    tiny_llava(path)
    return path


def pixels() -> Pixels:
    x = np.random.default_rng(3).standard_normal((1, 3, 28, 28)).astype(np.float32)
    return Pixels(x, (28, 28), (0, 0), 0)


@pytest.mark.parametrize("framework", ["torch", "mlx"])
def test_each_framework_keeps_the_contract(llava, framework):
    if framework == "mlx":
        pytest.importorskip("mlx.core")
    tower = load_tower(llava, framework)
    assert isinstance(tower, VisionTower) and tower.spec.arch == "llava"
    enc = tower.encode(pixels(), "hired", Budget(0.25))
    assert isinstance(enc, EncodedImage)
    embeds = enc.numpy_embeds()
    assert isinstance(embeds, np.ndarray) and embeds.dtype == np.float32
    assert embeds.shape == (sum(len(k) for k in enc.kept), tower.spec.text_hidden) == (4, 64)
    assert enc.total == 16 and enc.skipped == 0


def test_both_frameworks_give_the_same_numpy_embeddings(llava):
    pytest.importorskip("mlx.core")
    px = pixels()
    got = load_tower(llava, "mlx").encode(px, "full").numpy_embeds()
    want = load_tower(llava, "torch").encode(px, "full").numpy_embeds()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_an_unknown_framework_is_refused(llava):
    with pytest.raises(ValueError, match="no vision tower for framework 'jax'"):
        load_tower(llava, "jax")
