"""Where the cache root keeps agents, and the lock that guards each: the one path scheme.

Layout under the cache root::

    agents/<fingerprint digest>/<agent>/manifest.json
    agents/<fingerprint digest>/<agent>/b{start:08d}-{sha256[:16]}.safetensors
    agents/<fingerprint digest>/<agent>/quarantine/         (files that failed verification)
    agents/<fingerprint digest>/.locks/<agent>.lock         (inter-process lock)
    agents/<fingerprint digest>/.deleting-<agent>-<hex8>/   (an agent folder being removed)
    agents/<fingerprint digest>/model.json                  (which model: name, source, parts)
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edge_infer.cache_store.atomic_io import fsync_dir, private_dir
from edge_infer.cache_store.errors import InvalidAgentName
from edge_infer.cache_store.locking import path_lock

AGENTS_DIR = "agents"
AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
QUARANTINE_DIR = "quarantine"
LOCKS_DIR = ".locks"
MODEL_RECORD_NAME = "model.json"
DELETING_PREFIX = ".deleting-"
DELETING_RE = re.compile(r"^\.deleting-(.+)-[0-9a-f]{8}$")


def validate_agent_name(agent: str) -> str:
    """Return ``agent`` if it is a safe folder name, else raise InvalidAgentName."""
    if not isinstance(agent, str) or not AGENT_NAME_RE.match(agent):
        raise InvalidAgentName(
            f"invalid agent name {agent!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return agent


def agents_root(root: Path) -> Path:
    """Folder holding one sub-folder per model fingerprint."""
    return Path(root) / AGENTS_DIR


def fingerprint_dir(root: Path, digest: str) -> Path:
    """Folder of every agent cached under the fingerprint ``digest``."""
    return agents_root(root) / digest


def fingerprint_dirs(root: Path) -> list[Path]:
    """Every fingerprint folder under ``root``, by name."""
    base = agents_root(root)
    if not base.is_dir():
        return []
    return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_agent_dir(path: Path) -> bool:
    """Whether ``path`` is an agent's folder (a real folder with a valid agent name)."""
    return bool(AGENT_NAME_RE.match(path.name)) and path.is_dir() and not path.is_symlink()


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
    ``timeout=None`` waits as long as it takes."""
    path = lock_file(fp_dir, agent)
    private_dir(path.parent)
    with path_lock(path, timeout):
        yield


def delete_dir(path: Path) -> None:
    """Rename to ``.deleting-*`` (one atomic step readers see), then remove the tree."""
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
