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

from edge_infer.cache_store.atomic_io import TEMP_PREFIX, fsync_dir, write_atomic
from edge_infer.cache_store.block_codec import block_and_chain_from_bytes, block_to_bytes
from edge_infer.cache_store.blocks import KVBlock, check_contiguous, token_chains
from edge_infer.cache_store.errors import (
    CacheCorruptError,
    CacheVersionError,
    FingerprintMismatch,
    UnsafeCachePath,
)
from edge_infer.cache_store.kv_format import KVFormat
from edge_infer.cache_store.layout import (
    MODEL_RECORD_NAME,
    QUARANTINE_DIR,
    agent_dirs,
    agent_lock,
    delete_dir,
    dir_bytes,
    fingerprint_dir,
    fingerprint_dirs,
    is_link,
    is_regular_file,
    link_problem,
    page_index_path,
    private_subdir,
    read_nofollow,
    refuse_links,
    validate_agent_name,
)
from edge_infer.cache_store.manifest import (
    MANIFEST_NAME,
    BlockEntry,
    Manifest,
    block_file_name,
    is_block_file,
    now_iso,
)
from edge_infer.models.fingerprint import Fingerprint

log = logging.getLogger("edge_infer.cache")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
IDS_MISMATCH = "token ids differ from those its KV was computed from"


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
    files: list[str] = field(default_factory=list)  # the blocks' file names, in order
    verified: bool = True  # False: the files' hashes were not checked (``verify=False``)


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
        with os.fdopen(os.open(path, os.O_RDONLY | _NOFOLLOW), "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return b""
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        if is_link(path):
            return "a symbolic link (not followed)"
        return f"unreadable ({getattr(e, 'strerror', None) or e})"


# what a block's header may span: asked of the disk ahead of parsing
_HEADER_AHEAD = 64 * 1024


def _map_file_ahead(path: Path) -> mmap.mmap | bytes | str:
    """:func:`_map_file`, with the kernel asked to read the header's pages now: files
    mapped one after another then have their headers read from the disk together, not one
    page fault at a time as each is parsed."""
    data = _map_file(path)
    advice = getattr(mmap, "MADV_WILLNEED", None)  # not on every system
    if isinstance(data, mmap.mmap) and advice is not None:
        try:
            data.madvise(advice, 0, min(len(data), _HEADER_AHEAD))
        except OSError:  # only advice: the header is read when parsed either way
            pass
    return data


def _mapped_with_digest(path: Path) -> tuple[mmap.mmap | bytes | str, str | None]:
    data = _map_file(path)
    return data, None if isinstance(data, str) else _sha256(data)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
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
        # block -> (file name, sha256, token chain) for blocks this store wrote or read: saves
        # skip re-encoding a block whose file is already there.
        self._known: weakref.WeakKeyDictionary[KVBlock, tuple[str, str, str]] = (
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
        """The agent's folder; UnsafeCachePath if it, or a folder above it under the root, is a
        symbolic link."""
        return refuse_links(self.root, self.base_dir / validate_agent_name(agent))

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

    def _write_block(self, d: Path, block: KVBlock, chain: str) -> tuple[BlockEntry, bool]:
        """Write ``block`` (computed from the ids ``chain`` stands for) unless its file exists;
        return its entry and whether it wrote."""
        with self._known_lock:
            known = self._known.get(block)
        data = None
        if known is None or known[2] != chain or not is_regular_file(d / known[0]):
            data = block_to_bytes(block, self.fmt, chain)
            sha = _sha256(data)
            known = (block_file_name(block.start, sha), sha, chain)
        name, sha, _ = known
        wrote = False
        if data is not None and not is_regular_file(d / name):
            write_atomic(d / name, data, sync_dir=False)  # replaces a link, never follows it
            wrote = True
        with self._known_lock:
            self._known[block] = known
        return BlockEntry(name, block.start, block.length, block.sealed, sha, chain), wrote

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
        chains = token_chains(ids, [(b.start, b.length) for b in blocks])
        with self.lock(agent):
            private_subdir(self.root, d)
            self._write_model_record()
            entries: list[BlockEntry] = []
            wrote_any = False
            for block, chain in zip(blocks, chains, strict=True):
                entry, wrote = self._write_block(d, block, chain)
                entries.append(entry)
                wrote_any |= wrote
            if wrote_any:
                fsync_dir(d)
            old = self._read_manifest_quiet(d)
            now = now_iso()
            manifest = Manifest(
                agent=agent,
                fingerprint=dict(self.fingerprint.parts),
                kv_format=self.fmt.to_json(),
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
        if self.model_record is None or is_regular_file(path):
            return
        record = {
            **self.model_record,
            "fingerprint": dict(self.fingerprint.parts),
            "kv_format": self.fmt.to_json(),
        }
        write_atomic(path, json.dumps(record, indent=2, ensure_ascii=False).encode())

    @staticmethod
    def _remove_unreferenced(d: Path, keep: set[str]) -> None:
        for entry in os.scandir(d):
            name = entry.name
            stale = is_block_file(name) and name not in keep
            if (stale or name.startswith(TEMP_PREFIX)) and not entry.is_dir(follow_symlinks=False):
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    pass

    # -- load --------------------------------------------------------------------------

    @staticmethod
    def _read_manifest_quiet(d: Path) -> Manifest | None:
        try:
            return Manifest.from_bytes(read_nofollow(d / MANIFEST_NAME))
        except (OSError, CacheCorruptError, CacheVersionError, UnsafeCachePath):
            return None

    def _check_identity(self, agent: str, m: Manifest) -> None:
        differing = Fingerprint.of(**m.fingerprint).differing(self.fingerprint)
        mine = self.fmt.to_json()
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
        try:
            qdir = private_subdir(self.root, d / QUARANTINE_DIR)
        except (UnsafeCachePath, NotADirectoryError) as e:
            log.warning("%s; the unusable files stay where they are", e)
            return []
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

    def verified_block(self, d: Path, entry: BlockEntry, chain: str | None) -> KVBlock | str:
        """The block a manifest entry of agent folder ``d`` names, verified against the token
        chain of the manifest's ids (``chain``), or why it cannot be used."""
        return self._read_block(entry, chain, *_mapped_with_digest(d / entry.file))

    def _read_block(
        self,
        entry: BlockEntry,
        chain: str | None,
        data: mmap.mmap | bytes | str,
        digest: str | None,
    ) -> KVBlock | str:
        """The verified block from the file's data and digest, or why it cannot be used."""
        if isinstance(data, str):
            return data
        if digest != entry.sha256:
            return "sha256 mismatch"
        if chain is None or entry.token_chain is None:
            return "not bound to its token ids (written by an older edge-infer)"
        if entry.token_chain != chain:
            return IDS_MISMATCH
        try:
            block, stored_chain = block_and_chain_from_bytes(data)
        except CacheCorruptError as e:
            return str(e)
        if stored_chain != chain:
            return IDS_MISMATCH
        if (block.start, block.length, block.sealed) != (entry.start, entry.length, entry.sealed):
            return "span differs from the manifest"
        if not all(self.fmt.accepts_layer(x, block.sealed, i) for i, x in enumerate(block.layers)):
            return f"not in KV format {self.fmt.describe()}"
        return block

    def load(self, agent: str, verify: bool = True) -> AgentSnapshot | None:
        """Restore ``agent`` (its verified block prefix), or None if it has no usable cache.

        ``verify=False`` maps the block files without hashing them: their arrays are views
        of the files and nothing but the headers is read until they are used (an offloaded
        agent reads only the pages attention asks for). Everything else is still checked
        (header, token ids, span, format); :meth:`corrupt_files` hashes them later.

        Raises FingerprintMismatch if the manifest names another model or KV format, and
        CacheVersionError for a manifest format this version does not read.
        """
        d = self.agent_dir(agent)
        with self.lock(agent):
            d = self.agent_dir(agent)  # checked again under the lock
            try:
                with os.fdopen(os.open(d / MANIFEST_NAME, os.O_RDONLY | _NOFOLLOW), "rb") as f:
                    st = os.fstat(f.fileno())
                    raw = f.read()
            except FileNotFoundError:
                self._stamps[agent] = None
                return None
            except OSError:
                if not is_link(d / MANIFEST_NAME):
                    raise
                self._stamps[agent] = None
                self._quarantine(d, [MANIFEST_NAME])  # moves the link itself
                log.warning("agent %r: %s; cache not used", agent, link_problem(d / MANIFEST_NAME))
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
            if m.format_version < 2 and m.blocks:
                log.info(
                    "agent %r: cache written by an older edge-infer (manifest version %d); its "
                    "conversation is kept and its KV computed again",
                    agent,
                    m.format_version,
                )
                return self._snapshot(m, [], [])
            chains = token_chains(m.token_ids, [(e.start, e.length) for e in m.blocks])
            blocks: list[KVBlock] = []
            quarantined: list[str] = []
            # files are mapped and hashed on two threads (hashing releases the GIL) while
            # this one parses those already hashed
            unusable: tuple[int, str] | None = None
            with ThreadPoolExecutor(max_workers=2) as pool:
                paths = [d / e.file for e in m.blocks]
                if verify:
                    files = pool.map(_mapped_with_digest, paths)
                else:  # trusted for now: the manifest's digest stands in for the file's
                    mapped = pool.map(_map_file_ahead, paths)
                    files = ((x, e.sha256) for x, e in zip(mapped, m.blocks, strict=True))
                for i, entry in enumerate(m.blocks):
                    got = self._read_block(entry, chains[i], *next(files))
                    if isinstance(got, str):
                        unusable = (i, got)
                        break
                    blocks.append(got)
                    with self._known_lock:
                        self._known[got] = (entry.file, entry.sha256, chains[i])
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
        return self._snapshot(m, blocks, quarantined, verify)

    def corrupt_files(self, agent: str) -> list[str]:
        """Block files of ``agent``'s manifest whose content no longer matches their sha256
        (or that cannot be read): what a load with ``verify=False`` did not check."""
        d = self.agent_dir(agent)
        m = self._read_manifest_quiet(d)
        if m is None:
            return []
        bad = []
        for entry in m.blocks:
            data, digest = _mapped_with_digest(d / entry.file)
            if digest != entry.sha256:
                bad.append(entry.file)
            if isinstance(data, mmap.mmap):
                data.close()
        return bad

    def page_index_path(self, agent: str) -> Path:
        """Where ``agent``'s page index (the offloaded layers' page abstracts) is kept."""
        return page_index_path(self.agent_dir(agent))

    @staticmethod
    def _snapshot(
        m: Manifest, blocks: list[KVBlock], quarantined: list[str], verified: bool = True
    ) -> AgentSnapshot:
        return AgentSnapshot(
            token_ids=m.token_ids,
            messages=m.messages,
            extra=m.extra,
            blocks=blocks,
            valid_tokens=sum(b.length for b in blocks),
            quarantined=quarantined,
            created=m.created,
            updated=m.updated,
            files=[e.file for e in m.blocks[: len(blocks)]],
            verified=verified,
        )

    # -- housekeeping ------------------------------------------------------------------

    def changed_elsewhere(self, agent: str) -> bool:
        """Whether ``agent``'s manifest differs from the one this store last wrote or read
        (another process saved or deleted it). Call with the agent's lock held."""
        return _stamp(self.agent_dir(agent) / MANIFEST_NAME) != self._stamps.get(agent)

    def exists(self, agent: str) -> bool:
        """Whether ``agent`` has a manifest under this fingerprint (not through a link)."""
        try:
            return is_regular_file(self.agent_dir(agent) / MANIFEST_NAME)
        except UnsafeCachePath:
            return False

    def delete(self, agent: str) -> bool:
        """Remove an agent's cache (a linked agent folder: the link); False if there was none."""
        d = refuse_links(self.root, self.base_dir) / validate_agent_name(agent)
        with self.lock(agent):
            if not os.path.lexists(d):
                return False
            self._stamps[agent] = None
            delete_dir(d)
        return True

    def list_agents(self) -> list[StoredAgent]:
        """Agents cached under this fingerprint, by name (unreadable manifests skipped)."""
        if self.base_dir not in fingerprint_dirs(self.root):
            return []
        out = []
        for d in agent_dirs(self.base_dir):
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
        out = []
        for fp_dir in fingerprint_dirs(self.root):
            mpath = fp_dir / agent / MANIFEST_NAME
            if fp_dir.name == self.fingerprint.digest or is_link(fp_dir / agent):
                continue
            try:
                m = Manifest.from_bytes(read_nofollow(mpath))
            except CacheVersionError:
                out.append((fp_dir.name, ["format_version"]))
                continue
            except (OSError, CacheCorruptError, UnsafeCachePath):
                continue
            out.append((fp_dir.name, Fingerprint.of(**m.fingerprint).differing(self.fingerprint)))
        return out
