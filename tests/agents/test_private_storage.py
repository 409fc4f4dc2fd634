"""What agents leave on disk, on the real default model with 4-bit KV: private modes, nothing
read, written or moved through a link out of the cache root, and a damaged cache keeps its
valid prefix."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from edge_infer.cache_store.errors import UnsafeCachePath
from edge_infer.engine import Engine
from edge_infer.models.fingerprint import file_digest

pytest.importorskip("torch")

SYSTEM = "You answer in one short sentence."
# about 300 tokens: one sealed block of 256 and a tail before the first reply
LONG_SYSTEM = (
    SYSTEM + " " + " ".join(f"Rule {i}: stay calm, be kind and never shout." for i in range(22))
)


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def backend(default_model):
    from edge_infer.backends.torch.backend import TorchBackend

    return TorchBackend(default_model, device="cpu", kv_bits=4)


def engine(default_model, backend) -> Engine:
    """A fresh engine (its own agent manager, nothing in memory) on the shared model."""
    return Engine(default_model, backend)


def turn(eng: Engine, name: str, text: str, system: str = SYSTEM) -> int:
    """One short greedy turn, saved; the prompt tokens that came from the cache."""
    a = eng.agent(name, system=system)
    a.chat(text, temperature=0, max_tokens=4)
    eng.flush()
    return a.usage.cached_tokens


def snapshot(folder: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under ``folder``: mode and bytes (links: their target)."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[str(p)] = (st.st_mode, os.readlink(p))
            elif stat.S_ISREG(st.st_mode):
                out[str(p)] = (st.st_mode, p.read_bytes())
            else:
                out[str(p)] = (st.st_mode, "")
    return out


def test_everything_the_runtime_writes_is_private(default_model, backend, root, caplog) -> None:
    old = os.umask(0o022)
    try:
        file_digest(default_model.source)  # the digest memo, as loading the model writes it
        eng = engine(default_model, backend)
        turn(eng, "alice", "Hi")
        turn(eng, "alice", "And again?")
        eng.agent("alice").fork("bob")
        eng.flush()
        assert eng.delete_agent("bob")
        agent_dir = next(root.glob("agents/*/alice"))
        blocks = json.loads((agent_dir / "manifest.json").read_text())["blocks"]
        (agent_dir / blocks[-1]["file"]).write_bytes(b"damaged")  # makes quarantine/
        with caplog.at_level(logging.WARNING, logger="edge_infer.cache"):
            turn(engine(default_model, backend), "alice", "Once more?")
        assert (agent_dir / "quarantine").is_dir()
    finally:
        os.umask(old)
    seen = {"file-digests.json", "model.json", "manifest.json", "alice.lock", "quarantine"}
    found = set()
    for path, (mode, _) in snapshot(root).items():
        name = Path(path).name
        found.add(name)
        if stat.S_ISDIR(mode):
            assert stat.S_IMODE(mode) == 0o700, path
        else:
            assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600, path
    assert seen <= found
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


@pytest.mark.slow
def test_a_damaged_block_or_edited_ids_keep_the_valid_prefix(
    default_model, backend, root, caplog
) -> None:
    eng = engine(default_model, backend)
    turn(eng, "alice", "Hi", LONG_SYSTEM)
    agent_dir = next(root.glob("agents/*/alice"))
    manifest = agent_dir / "manifest.json"
    doc = json.loads(manifest.read_text())
    assert [b["sealed"] for b in doc["blocks"]] == [True, False]
    # a flipped byte in the second block: the first block's 256 tokens are still reused
    second = agent_dir / doc["blocks"][1]["file"]
    data = bytearray(second.read_bytes())
    data[len(data) // 2] ^= 1
    second.write_bytes(bytes(data))
    assert turn(engine(default_model, backend), "alice", "Again?", LONG_SYSTEM) == 256
    # a manifest claiming other ids inside the second block: reused up to there, then prefilled
    doc = json.loads(manifest.read_text())
    doc["token_ids"][280] = (doc["token_ids"][280] + 1) % 1000
    manifest.write_text(json.dumps(doc))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge_infer.cache"):
        a = engine(default_model, backend).agent("alice")
        assert len(a.messages) == 5  # the conversation itself is kept
        a.chat("Still there?", temperature=0, max_tokens=4)
    assert a.usage.cached_tokens == 256
    assert any("token ids differ" in r.getMessage() for r in caplog.records)


LEVELS = ["agents", "fingerprint", "agent", ".locks", "lock file"]


@pytest.mark.parametrize("level", LEVELS)
def test_a_link_at_any_level_is_refused(default_model, backend, root, tmp_path, level) -> None:
    eng = engine(default_model, backend)
    turn(eng, "alice", "Hi")
    fp_dir = next(root.glob("agents/*"))
    target = {
        "agents": root / "agents",
        "fingerprint": fp_dir,
        "agent": fp_dir / "alice",
        ".locks": fp_dir / ".locks",
        "lock file": fp_dir / ".locks" / "alice.lock",
    }[level]
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(target, outside / target.name)  # moved out, linked back
    target.symlink_to(outside / target.name)
    before = snapshot(outside)
    with pytest.raises(UnsafeCachePath, match="symbolic link") as exc:
        turn(engine(default_model, backend), "alice", "Again?")
    assert "\n" not in str(exc.value)
    if level in ("agents", "fingerprint", ".locks"):  # so is a new agent under the link
        with pytest.raises(UnsafeCachePath):
            turn(engine(default_model, backend), "carol", "Hello")
    assert snapshot(outside) == before


def test_linked_files_inside_an_agent_folder_are_not_followed(
    default_model, backend, root, tmp_path
) -> None:
    eng = engine(default_model, backend)
    turn(eng, "alice", "Hi")
    fp_dir = next(root.glob("agents/*"))
    agent_dir = fp_dir / "alice"
    outside = tmp_path / "outside"
    outside.mkdir()
    doc = json.loads((agent_dir / "manifest.json").read_text())
    first = agent_dir / doc["blocks"][0]["file"]
    os.rename(first, outside / first.name)
    first.symlink_to(outside / first.name)  # the very bytes, but behind a link
    (agent_dir / "quarantine").symlink_to(outside)  # bad files must not move out
    os.rename(fp_dir / "model.json", outside / "model.json")
    (fp_dir / "model.json").symlink_to(outside / "model.json")
    before = snapshot(outside)
    assert turn(engine(default_model, backend), "alice", "Again?") == 0
    assert snapshot(outside) == before
    assert not os.path.islink(fp_dir / "model.json")  # the save replaced the link
    assert (outside / first.name).is_file()
