"""Per-agent KV caches on disk, keyed by (model fingerprint, agent name).

Paths follow :mod:`.layout`. Block files are named by content and written once; the
manifest is replaced atomically last, then unreferenced files are removed, so a crash leaves
the old or the new state loadable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_infer.cache_store.atomic_io import TEMP_PREFIX, fsync_dir, private_dir, write_atomic
from edge_infer.cache_store.block_codec import block_from_bytes, block_to_bytes
from edge_infer.cache_store.blocks import KVBlock, check_contiguous
from edge_infer.cache_store.errors import (
    CacheCorruptError,
    CacheVersionError,
    FingerprintMismatch,
)
from edge_infer.cache_store.kv_format import KVFormat
from edge_infer.cache_store.layout import (
    AGENT_NAME_RE,
    MODEL_RECORD_NAME,
    QUARANTINE_DIR,
    agent_lock,
    agents_root,
    delete_dir,
    dir_bytes,
    fingerprint_dir,
    validate_agent_name,
)
from edge_infer.cache_store.manifest import (
    BLOCK_FILE_RE,
    MANIFEST_NAME,
    BlockEntry,
    Manifest,
    block_file_name,
    now_iso,
)
from edge_infer.models.fingerprint import Fingerprint

log = logging.getLogger("edge_infer.cache")

@dataclass(frozen=True)
class AgentSnapshot:
    """What :meth:`AgentStore.load` restores: the valid prefix of an agent's cache."""

    token_ids: list[int]  # every id the manifest lists (may exceed valid_tokens)
    messages: list[Any]
    extra: dict[str, Any]
    blocks: list[KVBlock]  # verified blocks, contiguous from position 0
    valid_tokens: int  # tokens covered by ``blocks``; the engine prefills the rest
    quarantined: list[str] = field(default_factory=list)  # block/manifest files set aside
    created: str = ""
    updated: str = ""


@dataclass(frozen=True)
class StoredAgent:
    """One agent as :meth:`AgentStore.list_agents` finds it on disk."""

    name: str
    tokens: int
    bytes_on_disk: int
    updated: str
    n_blocks: int
    messages: int = 0


def _sha256(data: bytes | mmap.mmap) -> str:
    return hashlib.sha256(data).hexdigest()


def _map_file(path: Path) -> mmap.mmap | bytes | str:
    """The file's bytes, mapped (copy-on-write: arrays over it are writable and never
    write back), or why it cannot be read."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"unreadable ({getattr(e, 'strerror', None) or e})"


def _mapped_with_digest(path: Path) -> tuple[mmap.mmap | bytes | str, str | None]:
    data = _map_file(path)
    return data, None if isinstance(data, str) else _sha256(data)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


class AgentStore:
    """Saves and restores agents' KV blocks for one model fingerprint and KV format."""

    def __init__(
        self,
        root: Path,
        fingerprint: Fingerprint,
        fmt: KVFormat,
        model_record: dict[str, Any] | None = None,
    ) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.fmt = fmt
        # written once to model.json so tools can name the model behind a fingerprint
        self.model_record = model_record
        # block -> (file name, sha256) for blocks this store wrote or read: saves skip
        # re-encoding a block whose file is already there.
        self._known: weakref.WeakKeyDictionary[KVBlock, tuple[str, str]] = (
            weakref.WeakKeyDictionary()
        )
        self._known_lock = threading.Lock()
        # agent -> identity of the manifest this store last wrote or read: tells whether
        # another process has saved the agent since
        self._stamps: dict[str, tuple[int, int] | None] = {}

    # -- paths and locking -------------------------------------------------------------

    @property
    def base_dir(self) -> Path:
        """Folder of every agent under this store's fingerprint."""
        return fingerprint_dir(self.root, self.fingerprint.digest)

    def agent_dir(self, agent: str) -> Path:
        return self.base_dir / validate_agent_name(agent)

    def _kv_format_json(self) -> dict[str, int]:
        f = self.fmt
        return {"bits": f.bits, "group_size": f.group_size, "block_size": f.block_size}

    @contextmanager
    def lock(self, agent: str, timeout: float | None = None) -> Iterator[None]:
        """Serialize access to ``agent`` across threads and processes (re-entrant)."""
        with agent_lock(self.base_dir, agent, timeout):
            yield

    # -- save --------------------------------------------------------------------------

    def _check_blocks(self, blocks: Sequence[KVBlock], n_ids: int) -> None:
        if blocks and blocks[0].start != 0:
            raise ValueError(f"first block must start at 0, not {blocks[0].start}")
        check_contiguous(blocks)
        for b in blocks:
            if b.length < 1 or b.length > self.fmt.block_size:
                raise ValueError(
                    f"block at {b.start} has {b.length} tokens (block size {self.fmt.block_size})"
                )
            if b.sealed and b.length != self.fmt.block_size:
                raise ValueError(f"sealed block at {b.start} is not full")
        if blocks and blocks[-1].end > n_ids:
            raise ValueError(f"blocks cover {blocks[-1].end} tokens but only {n_ids} ids given")

    def _write_block(self, d: Path, block: KVBlock) -> tuple[BlockEntry, bool]:
        """Write ``block`` unless its file exists; return its entry and whether it wrote."""
        with self._known_lock:
            known = self._known.get(block)
        data = None
        if known is None or not (d / known[0]).exists():
            data = block_to_bytes(block, self.fmt)
            sha = _sha256(data)
            known = (block_file_name(block.start, sha), sha)
        name, sha = known
        wrote = False
        if data is not None and not (d / name).exists():
            write_atomic(d / name, data, sync_dir=False)
            wrote = True
        with self._known_lock:
            self._known[block] = known
        return BlockEntry(name, block.start, block.length, block.sealed, sha), wrote

    def save(
        self,
        agent: str,
        token_ids: Sequence[int],
        blocks: Sequence[KVBlock],
        messages: Sequence[Any] = (),
        extra: dict[str, Any] | None = None,
    ) -> Manifest:
        """Persist an agent's cache: new block files first, the manifest last, then cleanup."""
        d = self.agent_dir(agent)
        ids = [int(t) for t in token_ids]
        blocks = list(blocks)
        self._check_blocks(blocks, len(ids))
        with self.lock(agent):
            private_dir(d)
            self._write_model_record()
            entries: list[BlockEntry] = []
            wrote_any = False
            for block in blocks:
                entry, wrote = self._write_block(d, block)
                entries.append(entry)
                wrote_any |= wrote
            if wrote_any:
                fsync_dir(d)
            old = self._read_manifest_quiet(d)
            now = now_iso()
            manifest = Manifest(
                agent=agent,
                fingerprint=dict(self.fingerprint.parts),
                kv_format=self._kv_format_json(),
                token_ids=ids,
                messages=list(messages),
                extra=dict(extra or {}),
                blocks=entries,
                created=old.created if old is not None and old.created else now,
                updated=now,
            )
            write_atomic(d / MANIFEST_NAME, manifest.to_bytes())
            self._stamps[agent] = _stamp(d / MANIFEST_NAME)
            self._remove_unreferenced(d, {e.file for e in entries})
        return manifest

    def _write_model_record(self) -> None:
        path = self.base_dir / MODEL_RECORD_NAME
        if self.model_record is None or path.exists():
            return
        record = {
            **self.model_record,
            "fingerprint": dict(self.fingerprint.parts),
            "kv_format": self._kv_format_json(),
        }
        write_atomic(path, json.dumps(record, indent=2, ensure_ascii=False).encode())

    @staticmethod
    def _remove_unreferenced(d: Path, keep: set[str]) -> None:
        for entry in os.scandir(d):
            name = entry.name
            stale = BLOCK_FILE_RE.match(name) and name not in keep
            if (stale or name.startswith(TEMP_PREFIX)) and entry.is_file(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    # -- load --------------------------------------------------------------------------

    @staticmethod
    def _read_manifest_quiet(d: Path) -> Manifest | None:
        try:
            return Manifest.from_bytes((d / MANIFEST_NAME).read_bytes())
        except (OSError, CacheCorruptError, CacheVersionError):
            return None

    def _check_identity(self, agent: str, m: Manifest) -> None:
        differing = Fingerprint.of(**m.fingerprint).differing(self.fingerprint)
        mine = self._kv_format_json()
        differing += sorted(
            f"kv_format.{k}"
            for k in mine.keys() | m.kv_format.keys()
            if mine.get(k) != m.kv_format.get(k)
        )
        if differing:
            raise FingerprintMismatch(
                f"cache for agent {agent!r} was made with a different model "
                f"(differs in: {', '.join(differing)})",
                differing,
            )

    def _quarantine(self, d: Path, names: Sequence[str]) -> list[str]:
        qdir = private_dir(d / QUARANTINE_DIR)
        moved = []
        for name in names:
            target, n = qdir / name, 1
            while target.exists():  # keep earlier evidence: manifest.json, manifest.json.1, ...
                target, n = qdir / f"{name}.{n}", n + 1
            try:
                os.replace(d / name, target)
                moved.append(name)
            except FileNotFoundError:
                continue
        fsync_dir(d)
        return moved

    def verified_block(self, d: Path, entry: BlockEntry) -> KVBlock | str:
        """The block a manifest entry of agent folder ``d`` names, verified, or why it
        cannot be used."""
        return self._read_block(entry, *_mapped_with_digest(d / entry.file))

    def _read_block(
        self, entry: BlockEntry, data: mmap.mmap | bytes | str, digest: str | None
    ) -> KVBlock | str:
        """The verified block from the file's data and digest, or why it cannot be used."""
        if isinstance(data, str):
            return data
        if digest != entry.sha256:
            return "sha256 mismatch"
        try:
            block = block_from_bytes(data)
        except CacheCorruptError as e:
            return str(e)
        if (block.start, block.length, block.sealed) != (entry.start, entry.length, entry.sealed):
            return "span differs from the manifest"
        if any(
            not (
                self.fmt.accepts(x.keys, block.sealed) and self.fmt.accepts(x.values, block.sealed)
            )
            for x in block.layers
        ):
            return f"not in KV format {self.fmt.describe()}"
        return block

    def load(self, agent: str) -> AgentSnapshot | None:
        """Restore ``agent`` (its verified block prefix), or None if it has no usable cache.

        Raises FingerprintMismatch if the manifest names another model or KV format, and
        CacheVersionError for a manifest format this version does not read.
        """
        d = self.agent_dir(agent)
        with self.lock(agent):
            try:
                with open(d / MANIFEST_NAME, "rb") as f:
                    st = os.fstat(f.fileno())
                    raw = f.read()
            except FileNotFoundError:
                self._stamps[agent] = None
                return None
            self._stamps[agent] = (st.st_ino, st.st_mtime_ns)
            try:
                m = Manifest.from_bytes(raw)
            except CacheCorruptError as e:
                self._quarantine(d, [MANIFEST_NAME])
                log.warning(
                    "agent %r: manifest is corrupt (%s); moved to %s, cache not used",
                    agent,
                    e,
                    d / QUARANTINE_DIR,
                )
                return None
            self._check_identity(agent, m)
            blocks: list[KVBlock] = []
            quarantined: list[str] = []
            # files are mapped and hashed on two threads (hashing releases the GIL) while
            # this one parses those already hashed
            unusable: tuple[int, str] | None = None
            with ThreadPoolExecutor(max_workers=2) as pool:
                files = pool.map(_mapped_with_digest, [d / e.file for e in m.blocks])
                for i, entry in enumerate(m.blocks):
                    got = self._read_block(entry, *next(files))
                    if isinstance(got, str):
                        unusable = (i, got)
                        break
                    blocks.append(got)
                    with self._known_lock:
                        self._known[got] = (entry.file, entry.sha256)
            if unusable is not None:
                i, why = unusable
                later = [e.file for e in m.blocks[i:]]
                quarantined = self._quarantine(d, later)
                log.warning(
                    "agent %r: block file %s is unusable (%s); dropping tokens %d.. "
                    "(%d block(s)) and quarantining them in %s",
                    agent,
                    m.blocks[i].file,
                    why,
                    m.blocks[i].start,
                    len(later),
                    d / QUARANTINE_DIR,
                )
        return AgentSnapshot(
            token_ids=m.token_ids,
            messages=m.messages,
            extra=m.extra,
            blocks=blocks,
            valid_tokens=sum(b.length for b in blocks),
            quarantined=quarantined,
            created=m.created,
            updated=m.updated,
        )

    # -- housekeeping ------------------------------------------------------------------

    def changed_elsewhere(self, agent: str) -> bool:
        """Whether ``agent``'s manifest differs from the one this store last wrote or read
        (another process saved or deleted it). Call with the agent's lock held."""
        return _stamp(self.agent_dir(agent) / MANIFEST_NAME) != self._stamps.get(agent)

    def exists(self, agent: str) -> bool:
        """Whether ``agent`` has a manifest under this fingerprint."""
        return (self.agent_dir(agent) / MANIFEST_NAME).is_file()

    def delete(self, agent: str) -> bool:
        """Remove an agent's cache; False if there was none."""
        d = self.agent_dir(agent)
        with self.lock(agent):
            if not d.exists():
                return False
            self._stamps[agent] = None
            delete_dir(d)
        return True

    def list_agents(self) -> list[StoredAgent]:
        """Agents cached under this fingerprint, by name (unreadable manifests skipped)."""
        if not self.base_dir.is_dir():
            return []
        out = []
        for d in sorted(self.base_dir.iterdir()):
            if not (AGENT_NAME_RE.match(d.name) and d.is_dir()):
                continue
            m = self._read_manifest_quiet(d)
            if m is None:
                continue
            out.append(
                StoredAgent(
                    d.name,
                    len(m.token_ids),
                    dir_bytes(d),
                    m.updated,
                    len(m.blocks),
                    messages=len(m.messages),
                )
            )
        return out

    def find_mismatched(self, agent: str) -> list[tuple[str, list[str]]]:
        """Caches of ``agent`` under other fingerprints: (digest, names of differing parts)."""
        validate_agent_name(agent)
        base = agents_root(self.root)
        if not base.is_dir():
            return []
        out = []
        for fp_dir in sorted(base.iterdir()):
            mpath = fp_dir / agent / MANIFEST_NAME
            if fp_dir.name == self.fingerprint.digest or not mpath.is_file():
                continue
            try:
                m = Manifest.from_bytes(mpath.read_bytes())
            except CacheVersionError:
                out.append((fp_dir.name, ["format_version"]))
                continue
            except (OSError, CacheCorruptError):
                continue
            out.append((fp_dir.name, Fingerprint.of(**m.fingerprint).differing(self.fingerprint)))
        return out
