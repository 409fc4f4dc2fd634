"""Model fingerprint: weight digests remembered per file, parts compared by name."""

from __future__ import annotations

import hashlib
import json
import os
import stat

from edge_infer.config import cache_root
from edge_infer.models.fingerprint import Fingerprint, file_digest, files_digest


def test_file_digest_is_sha256_and_remembered(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights" * 1000)
    assert file_digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    memo = json.loads((cache_root() / "file-digests.json").read_text())
    assert memo[str(f.resolve())]["sha256"] == file_digest(f)
    # a remembered digest is trusted while size and mtime are unchanged
    st = f.stat()
    memo[str(f.resolve())]["sha256"] = "remembered"
    (cache_root() / "file-digests.json").write_text(json.dumps(memo))
    assert file_digest(f) == "remembered"
    # touching the file (new mtime) forces a re-hash
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert file_digest(f) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_files_digest_changes_with_content(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    first = files_digest([a, b])
    assert first == files_digest([b, a])
    b.write_bytes(b"3")
    assert files_digest([a, b]) != first


def test_fingerprint_names_the_differing_part():
    base = Fingerprint.of(weights="w1", tokenizer="t1", chat_template="c1", kv_format="q4g64")
    same = Fingerprint.of(kv_format="q4g64", chat_template="c1", tokenizer="t1", weights="w1")
    assert base == same and base.digest == same.digest
    other = Fingerprint.of(weights="w1", tokenizer="t2", chat_template="c1", kv_format="q8g64")
    assert base.differing(other) == ["kv_format", "tokenizer"]
    assert base.digest != other.digest


def test_default_model_fingerprint_parts(default_model):
    parts = default_model.fingerprint_parts
    assert set(parts) == {"weights", "tokenizer", "chat_template"}
    assert parts["weights"] == file_digest(default_model.source)
    assert all(len(v) == 64 for v in parts.values())


def test_the_digest_memo_is_private_and_never_read_through_a_link(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(root))
    old = os.umask(0o022)
    try:
        f = tmp_path / "w.bin"
        f.write_bytes(b"weights")
        real = hashlib.sha256(b"weights").hexdigest()
        assert file_digest(f) == real
        memo = root / "file-digests.json"
        assert stat.S_IMODE(memo.stat().st_mode) == 0o600
        assert stat.S_IMODE(root.stat().st_mode) == 0o700
        # a planted memo behind a link claims another digest: it is neither read nor written
        fake = tmp_path / "planted.json"
        st = f.stat()
        fake.write_text(
            json.dumps(
                {str(f.resolve()): {"stamp": [st.st_size, st.st_mtime_ns], "sha256": "forged"}}
            )
        )
        memo.unlink()
        memo.symlink_to(fake)
        assert file_digest(f) == real
        assert not memo.is_symlink() and stat.S_IMODE(memo.stat().st_mode) == 0o600
        assert "forged" in fake.read_text()
    finally:
        os.umask(old)
