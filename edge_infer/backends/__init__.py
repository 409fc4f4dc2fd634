"""Backends: one subpackage per framework behind the protocol in :mod:`.base`."""

from edge_infer.backends.base import Backend, KVCache, create_backend, resolve_backend_name

__all__ = ["Backend", "KVCache", "create_backend", "resolve_backend_name"]
