"""What the cache root holds, read without loading a model: list, describe, verify, remove, gc.

Works on the on-disk layout of :mod:`.layout` for every fingerprint at once. Reading (scan,
describe, verify, a gc dry run) creates or changes no file; removal takes the agent's lock, as
the store does, so it is safe while an engine runs. A symbolic link where the layout expects a
folder or file is reported (and removed by ``remove_agent``), never followed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_infer.cache_store.atomic_io import TEMP_PREFIX
from edge_infer.cache_store.blocks import token_chains
from edge_infer.cache_store.errors import (
    CacheCorruptError,
    CacheError,
    CacheVersionError,
    UnsafeCachePath,
)
from edge_infer.cache_store.kv_format import KVFormat
from edge_infer.cache_store.layout import (
    DELETING_PREFIX,
    LOCKS_DIR,
    MODEL_RECORD_NAME,
    QUARANTINE_DIR,
    agent_dirs,
    agent_lock,
    agents_root,
    delete_dir,
    deleting_agent,
    dir_bytes,
    fingerprint_dirs,
    is_agent_dir,
    is_agent_name,
    is_link,
    is_regular_file,
    link_problem,
    linked_entries,
    lock_file,
    read_nofollow,
    validate_agent_name,
)
from edge_infer.cache_store.manifest import MANIFEST_NAME, Manifest, is_block_file
from edge_infer.cache_store.store import AgentStore
from edge_infer.models.fingerprint import Fingerprint

LOCK_TIMEOUT_S = 30.0
# Temp files outside an agent folder (model.json being written) are not guarded by any
# agent's lock: gc removes them only once they are this old.
TEMP_GRACE_S = 600.0
NO_MANIFEST = "no manifest"
PREVIEW_MESSAGES = 4
PREVIEW_CHARS = 80


# -- small helpers ------------------------------------------------------------------------


def _entry_bytes(path: Path) -> int:
    try:
        if path.is_dir() and not path.is_symlink():
            return dir_bytes(path)
        return os.lstat(path).st_size
    except OSError:
        return 0


@contextmanager
def existing_lock(fp_dir: Path, agent: str) -> Iterator[None]:
    """``agent_lock`` if its lock file exists (anyone writing the agent made it), else nothing.

    For readers that must not create files: no lock file means no writer has started.
    """
    path = lock_file(fp_dir, agent)
    if is_link(path) or is_link(path.parent):
        raise UnsafeCachePath(link_problem(path if is_link(path) else path.parent))
    if is_regular_file(path):
        with agent_lock(fp_dir, agent, LOCK_TIMEOUT_S):
            yield
    else:
        yield


def read_model_record(fp_dir: Path) -> dict[str, Any]:
    """``model.json`` of a fingerprint folder, or ``{}`` if missing or unreadable."""
    try:
        doc = json.loads(read_nofollow(fp_dir / MODEL_RECORD_NAME))
    except (OSError, ValueError, CacheError):
        return {}
    return doc if isinstance(doc, dict) else {}


def read_manifest(agent_dir: Path) -> tuple[Manifest | None, str | None]:
    """The parsed manifest, or None and why it cannot be used."""
    try:
        raw = read_nofollow(agent_dir / MANIFEST_NAME)
    except FileNotFoundError:
        return None, NO_MANIFEST
    except UnsafeCachePath as e:
        return None, str(e)
    except OSError as e:
        return None, f"manifest unreadable: {e.strerror or e}"
    try:
        return Manifest.from_bytes(raw), None
    except (CacheCorruptError, CacheVersionError) as e:
        return None, str(e)


def manifest_format(m: Manifest) -> KVFormat:
    """The KV format a manifest records (ValueError/TypeError if it names none we know)."""
    return KVFormat(**m.kv_format)


def _format_tag(m: Manifest) -> str:
    try:
        return manifest_format(m).describe()
    except (TypeError, ValueError):
        return "?"


def _identity_problem(fp_dir: Path, m: Manifest) -> str | None:
    digest = Fingerprint.of(**m.fingerprint).digest
    if digest != fp_dir.name:
        return f"manifest fingerprint {digest} does not match its folder {fp_dir.name}"
    return None


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", f"[{p.get('type', '?')}]") for p in content if isinstance(p, dict)]
        return " ".join(str(p) for p in parts)
    return "" if content is None else json.dumps(content, ensure_ascii=False)


def message_preview(message: Any, chars: int = PREVIEW_CHARS) -> tuple[str, str]:
    """``(role, first chars of the text on one line)`` of a chat message."""
    if not isinstance(message, dict):
        return "?", _shorten(json.dumps(message, ensure_ascii=False), chars)
    return str(message.get("role", "?")), _shorten(_text_of(message.get("content")), chars)


def _shorten(text: str, chars: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= chars else flat[: chars - 1] + "…"


# -- listing and describing ---------------------------------------------------------------


@dataclass(frozen=True)
class BlockInfo:
    """One block file a manifest lists; ``bytes`` is None when the file is missing."""

    file: str
    start: int
    length: int
    sealed: bool
    bytes: int | None

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "start": self.start,
            "length": self.length,
            "sealed": self.sealed,
            "bytes": self.bytes,
        }


@dataclass
class AgentRecord:
    """One agent folder under one fingerprint, as far as its manifest can be read."""

    agent: str
    digest: str
    path: Path
    model_name: str = "?"
    model_source: str = ""
    fingerprint: dict[str, str] = field(default_factory=dict)
    kv_format: str = "?"
    tokens: int = 0
    cached_tokens: int = 0
    messages: int = 0
    blocks: list[BlockInfo] = field(default_factory=list)
    bytes_on_disk: int = 0
    created: str = ""
    updated: str = ""
    quarantined: list[str] = field(default_factory=list)
    recent_messages: list[tuple[str, str]] = field(default_factory=list)
    readable: bool = False  # the manifest parsed
    problem: str | None = None

    def summary_json(self) -> dict[str, Any]:
        """The keys of ``cache ls --json``."""
        return {
            "agent": self.agent,
            "model": self.model_name,
            "digest": self.digest,
            "kv_format": self.kv_format,
            "tokens": self.tokens,
            "cached_tokens": self.cached_tokens,
            "messages": self.messages,
            "blocks": len(self.blocks),
            "bytes": self.bytes_on_disk,
            "created": self.created,
            "updated": self.updated,
            "path": str(self.path),
            "problem": self.problem,
        }

    def detail_json(self) -> dict[str, Any]:
        """The keys of ``cache show --json``: the summary plus parts, blocks and previews."""
        return {
            **self.summary_json(),
            "model_source": self.model_source,
            "fingerprint": dict(sorted(self.fingerprint.items())),
            "blocks": [b.to_json() for b in self.blocks],
            "quarantined": self.quarantined,
            "recent_messages": [{"role": r, "text": t} for r, t in self.recent_messages],
        }


def _quarantined(agent_dir: Path) -> list[str]:
    q = agent_dir / QUARANTINE_DIR
    if is_link(q) or not q.is_dir():
        return []
    return sorted(p.name for p in q.iterdir())


def _link_owner(root: Path, link: Path) -> tuple[str, str]:
    """(agent, digest) a linked entry stands in for; ``*`` for every one."""
    base = agents_root(root)
    if link == base:
        return "*", "*"
    if link.parent == base:
        return "*", link.name
    return link.name, link.parent.name


def _linked(root: Path, name: str | None = None) -> list[Path]:
    """Linked entries of the layout that concern agent ``name`` (or any agent)."""
    return [
        p for p in linked_entries(root) if name is None or _link_owner(root, p)[0] in (name, "*")
    ]


def _link_record(root: Path, link: Path) -> AgentRecord:
    agent, digest = _link_owner(root, link)
    return AgentRecord(agent=agent, digest=digest, path=link, problem=link_problem(link))


def _block_infos(agent_dir: Path, m: Manifest) -> list[BlockInfo]:
    out = []
    for e in m.blocks:
        try:
            size: int | None = os.lstat(agent_dir / e.file).st_size
        except OSError:
            size = None
        out.append(BlockInfo(e.file, e.start, e.length, e.sealed, size))
    return out


def read_agent(fp_dir: Path, agent_dir: Path, model: dict[str, Any] | None = None) -> AgentRecord:
    """Everything the files of one agent folder say about it (never raises on bad data)."""
    model = read_model_record(fp_dir) if model is None else model
    rec = AgentRecord(
        agent=agent_dir.name,
        digest=fp_dir.name,
        path=agent_dir,
        model_name=str(model.get("name") or "?"),
        model_source=str(model.get("source") or ""),
        bytes_on_disk=dir_bytes(agent_dir),
        quarantined=_quarantined(agent_dir),
    )
    m, problem = read_manifest(agent_dir)
    if m is None:
        rec.problem = problem
        return rec
    rec.readable = True
    rec.fingerprint = dict(m.fingerprint)
    rec.kv_format = _format_tag(m)
    rec.tokens = len(m.token_ids)
    rec.cached_tokens = m.cached_tokens
    rec.messages = len(m.messages)
    rec.blocks = _block_infos(agent_dir, m)
    rec.created, rec.updated = m.created, m.updated
    rec.recent_messages = [message_preview(x) for x in m.messages[-PREVIEW_MESSAGES:]]
    rec.problem = _identity_problem(fp_dir, m)
    return rec


def scan(root: Path) -> list[AgentRecord]:
    """Every agent folder under every fingerprint, sorted by agent name then digest."""
    out = [_link_record(root, p) for p in _linked(root)]
    for fp_dir in fingerprint_dirs(root):
        model = read_model_record(fp_dir)
        out.extend(read_agent(fp_dir, d, model) for d in agent_dirs(fp_dir))
    return sorted(out, key=lambda r: (r.agent, r.digest))


def _unknown_agent(root: Path, name: str) -> CacheError:
    return CacheError(f"no cached agent named {name!r} under {root}")


def describe(root: Path, name: str) -> list[AgentRecord]:
    """Agent ``name`` under every fingerprint; CacheError if it is cached under none."""
    validate_agent_name(name)
    out = [_link_record(root, p) for p in _linked(root, name)]
    out += [
        read_agent(fp_dir, fp_dir / name)
        for fp_dir in fingerprint_dirs(root)
        if is_agent_dir(fp_dir / name)
    ]
    if not out:
        raise _unknown_agent(root, name)
    return out


def total_bytes(root: Path) -> int:
    """Bytes of everything under the agents folder (leftovers included)."""
    base = agents_root(root)
    return dir_bytes(base) if base.is_dir() else 0


# -- verification -------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """Why one file of an agent cannot be used."""

    file: str
    reason: str

    def to_json(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason}


@dataclass
class VerifyResult:
    """The outcome of checking one agent folder; ``usable_tokens`` is the verified prefix."""

    agent: str
    digest: str
    path: Path
    tokens: int = 0
    cached_tokens: int = 0
    usable_tokens: int = 0
    blocks: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "digest": self.digest,
            "path": str(self.path),
            "ok": self.ok,
            "tokens": self.tokens,
            "cached_tokens": self.cached_tokens,
            "usable_tokens": self.usable_tokens,
            "blocks": self.blocks,
            "problems": [p.to_json() for p in self.problems],
        }


def _check_blocks(fp_dir: Path, agent_dir: Path, m: Manifest, res: VerifyResult) -> None:
    try:
        fmt = manifest_format(m)
    except (TypeError, ValueError) as e:
        res.problems.append(Problem(MANIFEST_NAME, f"unknown KV format {m.kv_format}: {e}"))
        return
    reader = AgentStore(fp_dir.parent.parent, Fingerprint.of(**m.fingerprint), fmt)
    chains: list[str | None] = [None] * len(m.blocks)
    if m.format_version >= 2:
        chains = list(token_chains(m.token_ids, [(e.start, e.length) for e in m.blocks]))
    prefix_ok = True
    for entry, chain in zip(m.blocks, chains, strict=True):
        got = reader.verified_block(agent_dir, entry, chain)  # a block, or why it is unusable
        if isinstance(got, str):
            res.problems.append(Problem(entry.file, got))
            prefix_ok = False
        elif prefix_ok:
            res.usable_tokens += entry.length


def verify_agent(fp_dir: Path, agent_dir: Path) -> VerifyResult:
    """Check one agent folder read-only: manifest, then every block file it lists."""
    res = VerifyResult(agent_dir.name, fp_dir.name, agent_dir)
    m, problem = read_manifest(agent_dir)
    if m is None:
        res.problems.append(Problem(MANIFEST_NAME, problem or "unreadable"))
        return res
    res.tokens, res.cached_tokens, res.blocks = len(m.token_ids), m.cached_tokens, len(m.blocks)
    identity = _identity_problem(fp_dir, m)
    if identity:
        res.problems.append(Problem(MANIFEST_NAME, identity))
    _check_blocks(fp_dir, agent_dir, m, res)
    return res


def verify(root: Path, name: str | None = None) -> list[VerifyResult]:
    """Verify every agent (or only ``name``, CacheError if unknown), each under its lock."""
    if name is not None:
        validate_agent_name(name)
    out = []
    for link in _linked(root, name):
        agent, digest = _link_owner(root, link)
        res = VerifyResult(agent, digest, link)
        res.problems.append(Problem(link.name, link_problem(link)))
        out.append(res)
    for fp_dir in fingerprint_dirs(root):
        dirs = [fp_dir / name] if name is not None else agent_dirs(fp_dir)
        for d in dirs:
            if is_agent_dir(d):
                out.append(_verify_locked(fp_dir, d))
    if name is not None and not out:
        raise _unknown_agent(root, name)
    return sorted(out, key=lambda r: (r.agent, r.digest))


def _verify_locked(fp_dir: Path, d: Path) -> VerifyResult:
    """``verify_agent`` under the agent's lock; a lock that cannot be taken is a problem."""
    try:
        with existing_lock(fp_dir, d.name):
            return verify_agent(fp_dir, d)
    except CacheError as e:  # a linked lock, or a timeout
        res = VerifyResult(d.name, fp_dir.name, d)
        res.problems.append(Problem(f"{LOCKS_DIR}/{d.name}.lock", str(e)))
        return res


# -- removal ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Removed:
    """One agent folder that ``remove_agent`` deleted."""

    agent: str
    digest: str
    model_name: str
    path: Path
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {
            "agent": self.agent,
            "digest": self.digest,
            "model": self.model_name,
            "path": str(self.path),
            "bytes": self.bytes,
        }


def _matching_dirs(root: Path, name: str, digest: str | None) -> list[Path]:
    found = [d for d in fingerprint_dirs(root) if is_agent_dir(d / name) or is_link(d / name)]
    if not found:
        raise _unknown_agent(root, name)
    if digest is None:
        return found
    chosen = [d for d in found if d.name.startswith(digest.lower())]
    if not chosen:
        have = ", ".join(d.name for d in found)
        raise CacheError(f"agent {name!r} has no cache for model {digest!r} (it has: {have})")
    if len(chosen) > 1:
        have = ", ".join(d.name for d in chosen)
        raise CacheError(f"model {digest!r} is ambiguous for agent {name!r}: {have}")
    return chosen


def remove_agent(root: Path, name: str, digest: str | None = None) -> list[Removed]:
    """Delete agent ``name`` under every fingerprint, or the one whose digest starts so."""
    validate_agent_name(name)
    out = []
    for fp_dir in _matching_dirs(root, name, digest):
        d = fp_dir / name
        if is_link(d):  # the link goes, never what it points to
            os.unlink(d)
            out.append(Removed(name, fp_dir.name, "?", d, 0))
            continue
        with agent_lock(fp_dir, name, LOCK_TIMEOUT_S):
            if not is_agent_dir(d):
                continue  # removed meanwhile
            size = dir_bytes(d)
            delete_dir(d)
        model = read_model_record(fp_dir).get("name") or "?"
        out.append(Removed(name, fp_dir.name, str(model), d, size))
    return out


# -- garbage collection -------------------------------------------------------------------


@dataclass(frozen=True)
class GcItem:
    """One file or folder gc removed (or would remove)."""

    path: Path
    kind: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "bytes": self.bytes}


@dataclass
class GcReport:
    """What ``collect_garbage`` removed (or, with ``dry_run``, would remove) and left alone."""

    dry_run: bool
    removed: list[GcItem] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(i.bytes for i in self.removed)

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "bytes_freed": self.bytes_freed,
            "removed": [i.to_json() for i in self.removed],
            "skipped": [{"path": str(p), "reason": r} for p, r in self.skipped],
        }


class _Collector:
    """Removes (or only records) leftovers for one gc run."""

    def __init__(self, dry_run: bool) -> None:
        self.report = GcReport(dry_run)

    def remove(self, path: Path, kind: str) -> None:
        size = _entry_bytes(path)
        if self.report.dry_run:  # what is inside was counted already
            size -= sum(i.bytes for i in self.report.removed if path in i.path.parents)
        else:
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except FileNotFoundError:
                return
        self.report.removed.append(GcItem(path, kind, size))

    def lock(self, fp_dir: Path, agent: str) -> AbstractContextManager[None]:
        """The agent's lock; a dry run creates no lock file (it removes nothing)."""
        if self.report.dry_run:
            return existing_lock(fp_dir, agent)
        return agent_lock(fp_dir, agent, LOCK_TIMEOUT_S)

    def skip(self, path: Path, reason: str) -> None:
        self.report.skipped.append((path, reason))


def _is_temp(entry: os.DirEntry) -> bool:
    return entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False)


def _gc_agent_dir(d: Path, gc: _Collector) -> None:
    """Under the agent's lock: temp files, quarantine, blocks its manifest does not list."""
    m, problem = read_manifest(d)
    trust_blocks = m is not None or problem == NO_MANIFEST
    keep = {e.file for e in m.blocks} if m is not None else set()
    left = 0
    for entry in sorted(os.scandir(d), key=lambda e: e.name):
        path = Path(entry.path)
        if _is_temp(entry):
            gc.remove(path, "temp file")
        elif entry.name == QUARANTINE_DIR and entry.is_dir(follow_symlinks=False):
            gc.remove(path, "quarantine")
        elif (
            trust_blocks
            and is_block_file(entry.name)
            and entry.name not in keep
            and entry.is_file(follow_symlinks=False)
        ):
            gc.remove(path, "unreferenced block")
        else:
            left += 1
    if m is None and not trust_blocks:
        gc.skip(d, f"{problem}; its block files are left as they are")
    elif m is None and left == 0:
        gc.remove(d, "agent folder without manifest")


def _gc_deleting_dir(fp_dir: Path, path: Path, gc: _Collector) -> None:
    """A ``.deleting-<agent>-<hex>`` folder, under that agent's lock (the store may be at it)."""
    agent = deleting_agent(path.name)
    if agent is None:
        gc.remove(path, "interrupted delete")
        return
    try:
        with gc.lock(fp_dir, agent):
            gc.remove(path, "interrupted delete")
    except CacheError as e:  # lock timeout
        gc.skip(path, str(e))


def _gc_locked_agent(fp_dir: Path, d: Path, gc: _Collector) -> None:
    try:
        with gc.lock(fp_dir, d.name):
            if is_agent_dir(d):
                _gc_agent_dir(d, gc)
    except CacheError as e:  # lock timeout: an engine is busy with it
        gc.skip(d, str(e))


def _only_metadata_left(fp_dir: Path, gc: _Collector) -> bool:
    """Whether ``fp_dir`` now holds nothing but model.json, locks and stale temp files."""
    gone = {i.path for i in gc.report.removed}
    now = time.time()
    for entry in os.scandir(fp_dir):
        path = Path(entry.path)
        if path in gone or entry.name in (MODEL_RECORD_NAME, LOCKS_DIR):
            continue
        if _is_temp(entry) and now - entry.stat(follow_symlinks=False).st_mtime > TEMP_GRACE_S:
            continue
        return False
    return True


def _gc_fingerprint_dir(fp_dir: Path, gc: _Collector) -> None:
    """Remove a fingerprint folder with no agents left, if no lock in it is held."""
    locks = fp_dir / LOCKS_DIR
    names = sorted(p.stem for p in locks.glob("*.lock")) if locks.is_dir() else []
    try:
        with ExitStack() as stack:
            for name in names:
                if is_agent_name(name):
                    stack.enter_context(agent_lock(fp_dir, name, timeout=0))
            if _only_metadata_left(fp_dir, gc):
                gc.remove(fp_dir, "model folder without agents")
    except CacheError:
        gc.skip(fp_dir, "an agent lock in it is held")


def _gc_loose_temps(fp_dir: Path, gc: _Collector) -> None:
    now = time.time()
    for entry in os.scandir(fp_dir):
        if _is_temp(entry) and now - entry.stat(follow_symlinks=False).st_mtime > TEMP_GRACE_S:
            gc.remove(Path(entry.path), "temp file")


def collect_garbage(root: Path, dry_run: bool = False) -> GcReport:
    """Remove what no agent needs; never a valid manifest or a block its manifest lists."""
    gc = _Collector(dry_run)
    for fp_dir in fingerprint_dirs(root):
        for entry in sorted(os.scandir(fp_dir), key=lambda e: e.name):
            if entry.name.startswith(DELETING_PREFIX) and entry.is_dir(follow_symlinks=False):
                _gc_deleting_dir(fp_dir, Path(entry.path), gc)
        for d in agent_dirs(fp_dir):
            _gc_locked_agent(fp_dir, d, gc)
        if _only_metadata_left(fp_dir, gc):
            _gc_fingerprint_dir(fp_dir, gc)
        else:
            _gc_loose_temps(fp_dir, gc)
    return gc.report
