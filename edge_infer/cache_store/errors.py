"""Errors raised by the KV cache store (all are :class:`EdgeInferError`)."""

from __future__ import annotations

from edge_infer.errors import EdgeInferError


class CacheError(EdgeInferError):
    """Base class of the cache store's errors."""


class CacheCorruptError(CacheError):
    """Cached bytes (a block file or manifest) are truncated, corrupt or inconsistent."""


class CacheVersionError(CacheError):
    """A cache was written in a format version this edge-infer does not read."""


class InvalidAgentName(CacheError, ValueError):
    """An agent name is empty, too long or contains characters outside ``[A-Za-z0-9._-]``."""


class FingerprintMismatch(CacheError):
    """A cache was made with a different model, tokenizer or KV format."""

    def __init__(self, message: str, differing: list[str]) -> None:
        super().__init__(message)
        self.differing = differing


class CacheLockTimeout(CacheError):
    """Another process held an agent's lock for longer than the caller would wait."""


class UnsafeCachePath(CacheError):
    """A path inside the cache root is a symbolic link (or not the kind of entry the layout
    expects): edge-infer reads, writes and moves nothing through it."""
