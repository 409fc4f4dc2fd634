"""Where the cache root keeps agents, and the lock that guards each: the one path scheme.

Layout under the cache root::

    agents/<fingerprint digest>/<agent>/manifest.json
    agents/<fingerprint digest>/<agent>/b{start:08d}-{sha256[:16]}.safetensors
    agents/<fingerprint digest>/<agent>/pages.safetensors   (page abstracts of offloaded layers)
    agents/<fingerprint digest>/<agent>/quarantine/         (files that failed verification)
    agents/<fingerprint digest>/.locks/<agent>.lock         (inter-process lock)
    agents/<fingerprint digest>/.deleting-<agent>-<hex8>/   (an agent folder being removed)
    agents/<fingerprint digest>/model.json                  (which model: name, source, parts)

Nothing below the cache root is followed through a symbolic link: every folder of an agent's
path is checked, files are opened with ``O_NOFOLLOW``, and a link where the layout expects a
file or folder is refused with :class:`UnsafeCachePath` (the root itself may be a link: the
user chose it).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_infer.cache_store.atomic_io import fsync_dir, private_dir
from edge_infer.cache_store.errors import InvalidAgentName, UnsafeCachePath
from edge_infer.cache_store.locking import path_lock

AGENTS_DIR = "agents"
# Patterns are whole-string (fullmatch): ``$`` would also match before a final newline.
_AGENT_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
QUARANTINE_DIR = "quarantine"
PAGE_INDEX_NAME = "pages.safetensors"
LOCKS_DIR = ".locks"
MODEL_RECORD_NAME = "model.json"
DELETING_PREFIX = ".deleting-"
_DELETING_RE = re.compile(r"\.deleting-(.+)-[0-9a-f]{8}")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def is_agent_name(name: object) -> bool:
    """Whether ``name`` is a valid agent name (the whole string, no trailing newline)."""
    return isinstance(name, str) and _AGENT_NAME_RE.fullmatch(name) is not None


def deleting_agent(name: str) -> str | None:
    """The agent a ``.deleting-<agent>-<hex8>`` folder name belongs to, or None."""
    m = _DELETING_RE.fullmatch(name)
    return m.group(1) if m and is_agent_name(m.group(1)) else None


def validate_agent_name(agent: str) -> str:
    """Return ``agent`` if it is a safe folder name, else raise InvalidAgentName."""
    if not is_agent_name(agent):
        raise InvalidAgentName(
            f"invalid agent name {agent!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return agent


def is_link(path: Path) -> bool:
    """Whether ``path`` itself is a symbolic link (a missing path is not)."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return False


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file, not through a link."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def link_problem(path: Path) -> str:
    """The one-line reason a linked cache entry is refused."""
    return f"{path} is a symbolic link; edge-infer does not follow links inside its cache"


def refuse_links(root: Path, path: Path) -> Path:
    """``path`` if no part of it below ``root`` (``path`` included) is a symbolic link, else
    UnsafeCachePath; parts that do not exist yet are fine."""
    root, path = Path(root), Path(path)
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise UnsafeCachePath(f"{path} is outside the cache root {root}") from None
    p = root
    for part in rel.parts:
        p = p / part
        if is_link(p):
            raise UnsafeCachePath(link_problem(p))
    return path


def private_subdir(root: Path, path: Path) -> Path:
    """Create folder ``path`` under ``root`` (missing parts 0700), refusing links below root."""
    refuse_links(root, path)
    private_dir(path)
    return refuse_links(root, path)  # made by someone else meanwhile: still no link


def read_nofollow(path: Path, limit: int | None = None) -> bytes:
    """The bytes of regular file ``path``, never through a link: a link gives
    UnsafeCachePath; a missing file FileNotFoundError. At most ``limit`` bytes when given."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except OSError as e:
        if e.errno == errno.ELOOP or is_link(path):
            raise UnsafeCachePath(link_problem(path)) from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UnsafeCachePath(f"{path} is not a regular file")
        return f.read() if limit is None else f.read(limit)


def agents_root(root: Path) -> Path:
    """Folder holding one sub-folder per model fingerprint."""
    return Path(root) / AGENTS_DIR


def fingerprint_dir(root: Path, digest: str) -> Path:
    """Folder of every agent cached under the fingerprint ``digest``."""
    return agents_root(root) / digest


def _real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def fingerprint_dirs(root: Path) -> list[Path]:
    """Every fingerprint folder under ``root``, by name (links are not folders here)."""
    base = agents_root(root)
    if not _real_dir(base):
        return []
    return sorted(p for p in base.iterdir() if _real_dir(p) and not p.name.startswith("."))


def linked_entries(root: Path) -> list[Path]:
    """Symbolic links where the layout expects a folder: ``agents/``, a fingerprint folder,
    or an agent folder (reported by the admin tools, never followed)."""
    base = agents_root(root)
    if is_link(base):
        return [base]
    if not _real_dir(base):
        return []
    out = []
    for p in sorted(base.iterdir()):
        if p.name.startswith("."):
            continue
        if is_link(p):
            out.append(p)
        elif _real_dir(p):
            out += [a for a in sorted(p.iterdir()) if is_agent_name(a.name) and is_link(a)]
    return out


def is_agent_dir(path: Path) -> bool:
    """Whether ``path`` is an agent's folder (a real folder with a valid agent name)."""
    return is_agent_name(path.name) and _real_dir(path)


def agent_dirs(fp_dir: Path) -> list[Path]:
    """The agent folders of fingerprint folder ``fp_dir``, by name."""
    try:
        return sorted(p for p in fp_dir.iterdir() if is_agent_dir(p))
    except FileNotFoundError:  # removed meanwhile
        return []


def lock_file(fp_dir: Path, agent: str) -> Path:
    """The file behind ``agent``'s inter-process lock."""
    return fp_dir / LOCKS_DIR / f"{validate_agent_name(agent)}.lock"


@contextmanager
def agent_lock(fp_dir: Path, agent: str, timeout: float | None = None) -> Iterator[None]:
    """The inter-process lock of ``agent`` under fingerprint folder ``fp_dir`` (re-entrant);
    ``timeout=None`` waits as long as it takes. A linked ``.locks`` folder or lock file (or a
    linked folder above them, up to ``agents/``) is refused with UnsafeCachePath."""
    path = lock_file(fp_dir, agent)
    private_subdir(fp_dir.parent.parent, path.parent)
    if is_link(path):
        raise UnsafeCachePath(link_problem(path))
    with path_lock(path, timeout):
        yield


def delete_dir(path: Path) -> None:
    """Rename to ``.deleting-*`` (one atomic step readers see), then remove the tree; a link
    is removed itself, never what it points to."""
    if is_link(path):
        os.unlink(path)
        fsync_dir(path.parent)
        return
    doomed = path.with_name(f"{DELETING_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def dir_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (links not followed; vanished files skipped)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def page_index_path(agent_dir: Path) -> Path:
    """The agent's page index file (rebuildable from its blocks: losing it costs a read)."""
    return Path(agent_dir) / PAGE_INDEX_NAME
