"""Shared fixtures: the embedded default model, loaded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.installed import HAS_MLX, HAS_TORCH


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from edge_infer.models.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def default_model(default_model_path):
    from edge_infer.models.loader import load_model

    return load_model(default_model_path)


@pytest.fixture(scope="session")
def torch_engine(default_model):
    if not HAS_TORCH:
        pytest.skip("torch not installed")
    from edge_infer.backends.torch.backend import TorchBackend
    from edge_infer.engine import Engine

    # float16 KV: these engines check the model's arithmetic; KV quantization is measured apart
    return Engine(default_model, TorchBackend(default_model, device="cpu", kv_bits=16))


@pytest.fixture(scope="session")
def mlx_engine(default_model):
    if not HAS_MLX:
        pytest.skip("mlx not installed")
    from edge_infer.backends.mlx.backend import MLXBackend
    from edge_infer.engine import Engine

    return Engine(default_model, MLXBackend(default_model, kv_bits=16))


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Keep every cache write of the session (session fixtures too) in a temporary folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("EDGE_INFER_MODELS_DIR", raising=False)
        mp.delenv("EDGE_INFER_BACKEND", raising=False)
        yield
