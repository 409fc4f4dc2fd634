"""edge-infer: local LLM runtime for small machines.

>>> from edge_infer import Engine
>>> eng = Engine.load()                      # embedded default model, automatic backend
>>> eng.chat([{"role": "user", "content": "Hi"}], max_tokens=32)
"""

from edge_infer.engine import Engine
from edge_infer.errors import (
    BackendUnavailableError,
    ContextLengthError,
    EdgeInferError,
    ModelFormatError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import Usage

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "Usage",
    "SamplingParams",
    "EdgeInferError",
    "ModelNotFoundError",
    "ModelFormatError",
    "UnsupportedModelError",
    "ContextLengthError",
    "BackendUnavailableError",
]
