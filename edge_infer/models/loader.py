"""Find and load a model from what the user named: nothing, a .gguf file or a directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edge_infer.errors import EdgeInferError, ModelFormatError, ModelNotFoundError
from edge_infer.models.default_model import (
    DEFAULT_MODEL_NAME,
    default_model_path,
    packaged_model,
    packaged_model_path,
)
from edge_infer.models.gguf.loader import load_gguf
from edge_infer.models.hf.loader import load_hf_dir
from edge_infer.models.spec import LoadedModel


def resolve_model_path(model: str | Path | None) -> Path:
    """The path to load for ``model`` (None = the embedded default; a packaged model's key,
    e.g. ``gemma3-270m``, its assembled file)."""
    if model is None or str(model) in ("", "default"):
        return default_model_path()
    packaged = packaged_model(str(model))
    if packaged is not None and not Path(model).exists():
        return packaged_model_path(packaged)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"{path}: no such file or directory (give a .gguf file or a model directory; "
            "`edge-infer models` lists the models it can see)"
        )
    return path


def load_model(
    model: str | Path | None = None, progress: Callable[[int, int], None] | None = None
) -> LoadedModel:
    """Load a GGUF file or a Hugging Face / MLX safetensors directory."""
    path = resolve_model_path(model)
    if path.is_dir():
        try:
            return load_hf_dir(path, progress=progress)
        except (ValueError, TypeError, KeyError, ArithmeticError) as exc:
            if isinstance(exc, EdgeInferError):
                raise
            raise ModelFormatError(f"{path}: {exc}") from None
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or path.suffix.lower() == ".gguf":
        loaded = load_gguf(path, progress=progress)
        if model is None or str(model) in ("", "default"):
            loaded.name = DEFAULT_MODEL_NAME
        elif (packaged := packaged_model(str(model))) is not None:
            loaded.name = packaged.title
        return loaded
    raise ModelFormatError(
        f"{path}: unsupported model file (expected a .gguf file or a directory with config.json "
        "and .safetensors weights)"
    )
