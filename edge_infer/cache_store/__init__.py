"""Per-agent KV caches: Q4/Q8/F16 KV format, blocks, on-disk store, memory pool, prefixes.

Works on numpy arrays and bytes only; it never imports a backend, torch or mlx.
"""

from edge_infer.cache_store.atomic_io import fsync_dir, private_dir, write_atomic
from edge_infer.cache_store.block_codec import block_from_bytes, block_to_bytes
from edge_infer.cache_store.blocks import (
    KVBlock,
    compute_abstract,
    extend_blocks,
    merge_blocks,
    split_into_blocks,
)
from edge_infer.cache_store.errors import (
    CacheCorruptError,
    CacheError,
    CacheLockTimeout,
    CacheVersionError,
    FingerprintMismatch,
    InvalidAgentName,
    UnsafeCachePath,
)
from edge_infer.cache_store.kv_format import KVArray, KVFormat, LayerKV, QuantizedKV
from edge_infer.cache_store.layout import validate_agent_name
from edge_infer.cache_store.manifest import Manifest
from edge_infer.cache_store.pool import BlockPool, default_budget_bytes
from edge_infer.cache_store.prefix import blocks_for_prefix, common_prefix_len
from edge_infer.cache_store.store import AgentSnapshot, AgentStore, StoredAgent

__all__ = [
    "AgentSnapshot",
    "AgentStore",
    "BlockPool",
    "CacheCorruptError",
    "CacheError",
    "CacheLockTimeout",
    "CacheVersionError",
    "FingerprintMismatch",
    "InvalidAgentName",
    "KVArray",
    "KVBlock",
    "KVFormat",
    "LayerKV",
    "Manifest",
    "QuantizedKV",
    "StoredAgent",
    "UnsafeCachePath",
    "block_from_bytes",
    "block_to_bytes",
    "blocks_for_prefix",
    "common_prefix_len",
    "compute_abstract",
    "default_budget_bytes",
    "extend_blocks",
    "fsync_dir",
    "merge_blocks",
    "private_dir",
    "split_into_blocks",
    "validate_agent_name",
    "write_atomic",
]
