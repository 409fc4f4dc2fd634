"""The per-agent manifest: what the cache holds and which block files make it up (JSON)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from edge_infer.cache_store.errors import CacheCorruptError, CacheVersionError

MANIFEST_NAME = "manifest.json"
# 2: each block entry records its token chain (the ids it was computed from, chained over the
# blocks before it). A version 1 manifest still loads: its conversation is kept, its blocks
# are not reused (nothing binds them to the ids) and are computed again.
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Whole-string patterns (fullmatch), ASCII digits only.
_BLOCK_FILE_RE = re.compile(r"b[0-9]{8,}-[0-9a-f]{16}\.safetensors")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
MAX_TOKEN_ID = 2**31 - 1


def is_block_file(name: str) -> bool:
    """Whether ``name`` is a block file name the store writes."""
    return _BLOCK_FILE_RE.fullmatch(name) is not None


def is_sha256(text: object) -> bool:
    """Whether ``text`` is a lowercase hex sha256."""
    return isinstance(text, str) and _SHA256_RE.fullmatch(text) is not None


def block_file_name(start: int, sha256: str) -> str:
    """Content-addressed name of a block file: ``b{start:08d}-{sha256[:16]}.safetensors``."""
    return f"b{start:08d}-{sha256[:16]}.safetensors"


def now_iso() -> str:
    """The current UTC time as ISO 8601 with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class BlockEntry:
    """One block file of an agent's cache."""

    file: str
    start: int
    length: int
    sealed: bool
    sha256: str
    token_chain: str | None = None  # None only in version 1 manifests

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "start": self.start,
            "length": self.length,
            "sealed": self.sealed,
            "sha256": self.sha256,
            "token_chain": self.token_chain,
        }

    @classmethod
    def from_json(cls, d: Any, version: int = MANIFEST_VERSION) -> BlockEntry:
        if not isinstance(d, dict):
            raise CacheCorruptError("manifest block entry is not an object")
        file, sha, chain = d.get("file"), d.get("sha256"), d.get("token_chain")
        start, length, sealed = d.get("start"), d.get("length"), d.get("sealed")
        if not (isinstance(file, str) and is_block_file(file)):
            raise CacheCorruptError(f"manifest names a bad block file {file!r}")
        if not is_sha256(sha):
            raise CacheCorruptError(f"manifest has a bad sha256 for {file}")
        if version >= 2 and not is_sha256(chain):
            raise CacheCorruptError(f"manifest has a bad token_chain for {file}")
        if not (_is_int(start) and _is_int(length) and start >= 0 and length > 0):
            raise CacheCorruptError(f"manifest has a bad span for {file}")
        if not isinstance(sealed, bool):
            raise CacheCorruptError(f"manifest has a bad sealed flag for {file}")
        return cls(file, start, length, sealed, sha, chain if version >= 2 else None)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_int_or_ints(v: Any) -> bool:
    return _is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v))


@dataclass
class Manifest:
    """Everything about one agent's cache except the KV bytes."""

    agent: str
    fingerprint: dict[str, str]
    kv_format: dict[str, Any]  # integers, and a list of them for per-layer bits
    token_ids: list[int]
    messages: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    blocks: list[BlockEntry] = field(default_factory=list)
    created: str = ""
    updated: str = ""
    format_version: int = MANIFEST_VERSION

    @property
    def cached_tokens(self) -> int:
        """Tokens covered by the listed blocks."""
        return sum(b.length for b in self.blocks)

    def to_bytes(self) -> bytes:
        doc = {
            "format_version": MANIFEST_VERSION,
            "agent": self.agent,
            "fingerprint": self.fingerprint,
            "kv_format": self.kv_format,
            "created": self.created,
            "updated": self.updated,
            "blocks": [b.to_json() for b in self.blocks],
            "token_ids": self.token_ids,
            "messages": self.messages,
            "extra": self.extra,
        }
        return json.dumps(doc, ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and validate; bad JSON or structure -> CacheCorruptError."""
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise CacheCorruptError(f"manifest is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise CacheCorruptError("manifest is not a JSON object")
        version = doc.get("format_version")
        if not _is_int(version):
            raise CacheCorruptError("manifest has no format_version")
        if version not in READABLE_VERSIONS:
            raise CacheVersionError(
                f"cache manifest format version {version} is not supported "
                f"(this edge-infer reads versions {', '.join(map(str, READABLE_VERSIONS))})"
            )
        fp, kvf, ids = doc.get("fingerprint"), doc.get("kv_format"), doc.get("token_ids")
        if not (isinstance(fp, dict) and all(isinstance(v, str) for v in fp.values())):
            raise CacheCorruptError("manifest fingerprint is not an object of strings")
        if not (isinstance(kvf, dict) and all(_is_int_or_ints(v) for v in kvf.values())):
            raise CacheCorruptError(
                "manifest kv_format is not an object of integers (or lists of them)"
            )
        if not (isinstance(ids, list) and all(_is_int(t) and 0 <= t <= MAX_TOKEN_ID for t in ids)):
            raise CacheCorruptError("manifest token_ids is not a list of token ids")
        messages, extra, blocks = doc.get("messages"), doc.get("extra"), doc.get("blocks")
        if not isinstance(messages, list) or not isinstance(extra, dict):
            raise CacheCorruptError("manifest messages/extra have the wrong type")
        if not isinstance(blocks, list):
            raise CacheCorruptError("manifest blocks is not a list")
        entries = [BlockEntry.from_json(b, version) for b in blocks]
        m = cls(
            agent=str(doc.get("agent", "")),
            fingerprint=fp,
            kv_format=kvf,
            token_ids=ids,
            messages=messages,
            extra=extra,
            blocks=entries,
            created=str(doc.get("created", "")),
            updated=str(doc.get("updated", "")),
            format_version=version,
        )
        m.check_spans()
        return m

    def check_spans(self) -> None:
        """Blocks must be contiguous from 0 and cover no more than the token ids."""
        pos = 0
        for b in self.blocks:
            if b.start != pos:
                raise CacheCorruptError(f"manifest blocks not contiguous at {b.file}")
            pos += b.length
        if pos > len(self.token_ids):
            raise CacheCorruptError(f"blocks cover {pos} tokens but only {len(self.token_ids)} ids")
