"""Model fingerprint: what a KV cache must match to be reused (weights, tokenizer, KV format)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edge_infer.config import cache_root, ensure_private_dir

_MEMO_FILE = "file-digests.json"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, remembered by (path, size, mtime) under the cache root."""
    path = path.resolve()
    st = path.stat()
    key = str(path)
    stamp = [st.st_size, st.st_mtime_ns]
    memo_path = cache_root() / _MEMO_FILE
    memo: dict[str, dict] = {}
    try:  # never through a link: the memo is ours, under the cache root
        with os.fdopen(os.open(memo_path, os.O_RDONLY | _NOFOLLOW), "rb") as f:
            memo = json.loads(f.read())
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    hit = memo.get(key)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
        return hit["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    memo[key] = {"stamp": stamp, "sha256": digest}
    try:
        ensure_private_dir(memo_path.parent)
        tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
        # 0600 like everything under the cache root (it names the models a user runs)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(json.dumps(memo))
        os.replace(tmp, memo_path)  # replaces a link itself, never its target
    except OSError:
        pass  # a read-only cache dir only costs a re-hash next time
    return digest


def files_digest(paths: Iterable[Path]) -> str:
    """Combined digest of several weight files (order-independent by name)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(p.name.encode() + b"\0" + file_digest(p).encode())
    return h.hexdigest()


def text_digest(*parts: str | bytes) -> str:
    """sha256 over a sequence of strings/bytes, separated so that boundaries count."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """Named parts (weights, tokenizer, chat_template, kv_format...) and their combined digest."""

    parts: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, **parts: str) -> Fingerprint:
        return cls(tuple(sorted(parts.items())))

    @property
    def digest(self) -> str:
        return text_digest(*(f"{k}={v}" for k, v in self.parts))[:16]

    def differing(self, other: Fingerprint) -> list[str]:
        """Names of the parts that differ from ``other``."""
        a, b = dict(self.parts), dict(other.parts)
        return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
