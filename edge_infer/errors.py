"""Errors a user can see. Each carries a one-line message naming the file or value at fault."""

from __future__ import annotations


class EdgeInferError(Exception):
    """Base class of every error edge-infer reports to its users."""


class ModelNotFoundError(EdgeInferError):
    """A model path does not exist or holds no model we recognise."""


class ModelFormatError(EdgeInferError):
    """A model file is truncated, corrupt or not in the format its name claims."""


class UnsupportedModelError(EdgeInferError):
    """A model uses an architecture, tensor type or feature we do not implement."""


class ContextLengthError(EdgeInferError):
    """A prompt (plus what is to be generated) does not fit the model's context."""


class BackendUnavailableError(EdgeInferError):
    """The requested backend cannot run on this machine (package or device missing)."""


class GrammarError(EdgeInferError):
    """A JSON schema, regex or grammar that constrained decoding cannot use."""
