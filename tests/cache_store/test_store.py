"""Tests for the per-agent on-disk KV cache store (real files under tmp_path)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from edge_infer.cache_store import (
    AgentStore,
    CacheVersionError,
    FingerprintMismatch,
    InvalidAgentName,
    KVFormat,
    blocks_for_prefix,
    extend_blocks,
    split_into_blocks,
)
from edge_infer.cache_store.block_codec import block_and_chain_from_bytes
from edge_infer.cache_store.blocks import token_chains
from edge_infer.cache_store.errors import UnsafeCachePath
from edge_infer.errors import EdgeInferError
from edge_infer.models.fingerprint import Fingerprint
from tests.support.cache_store_helpers import assert_blocks_equal, random_layers

FMT = KVFormat(4, 64, 16)
FP = Fingerprint.of(weights="aaa", tokenizer="tok", chat_template="tpl", kv_format="q4g64")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "héllo"}]


@pytest.fixture
def store(tmp_path: Path) -> AgentStore:
    return AgentStore(tmp_path / "cache", FP, FMT)


def _blocks(n_tokens: int, seed: int = 0, fmt: KVFormat = FMT):
    return split_into_blocks(random_layers(fmt, n_tokens, seed=seed), 0, fmt.block_size)


def _files(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if p.is_file()}


def test_save_load_round_trip(store: AgentStore) -> None:
    blocks = _blocks(40)
    ids = list(range(1000, 1041))  # one id more than the KV holds
    m = store.save("writer", ids, blocks, MESSAGES, {"system": "Be brief.", "overflow": "trim"})
    assert store.exists("writer") and not store.exists("other")
    assert [b.file for b in m.blocks][0].startswith("b00000000-")
    snap = store.load("writer")
    assert snap is not None
    assert snap.token_ids == ids and snap.messages == MESSAGES
    assert snap.extra == {"system": "Be brief.", "overflow": "trim"}
    assert snap.valid_tokens == 40 and snap.quarantined == []
    assert snap.created and snap.updated
    assert_blocks_equal(snap.blocks, blocks)
    # a fresh store (another process, in effect) reads the same
    again = AgentStore(store.root, FP, FMT).load("writer")
    assert_blocks_equal(again.blocks, blocks)
    assert store.load("nobody") is None


@pytest.mark.parametrize("fmt", [KVFormat(8, 32, 16), KVFormat(16, 64, 16)], ids=str)
def test_round_trip_other_formats(tmp_path: Path, fmt: KVFormat) -> None:
    store = AgentStore(tmp_path, FP, fmt)
    blocks = _blocks(20, fmt=fmt)
    store.save("a", range(20), blocks)
    assert_blocks_equal(store.load("a").blocks, blocks)


def test_layers_in_other_bits_round_trip_and_name_the_difference(tmp_path: Path) -> None:
    mixed = KVFormat(4, 64, 16, layer_bits=(8, 4))
    store = AgentStore(tmp_path, FP, mixed)
    blocks = _blocks(20, fmt=mixed)
    store.save("a", range(20), blocks)
    doc = json.loads((store.agent_dir("a") / "manifest.json").read_text())
    assert doc["kv_format"]["layer_bits"] == [8, 4]
    again = AgentStore(tmp_path, FP, KVFormat(4, 64, 16, layer_bits=[8, 4])).load("a")
    assert_blocks_equal(again.blocks, blocks)
    assert [x.keys.bits for x in again.blocks[0].layers] == [8, 4]
    with pytest.raises(FingerprintMismatch, match="kv_format.layer_bits"):
        AgentStore(tmp_path, FP, FMT).load("a")


def test_layout_manifest_and_permissions(store: AgentStore) -> None:
    store.save("a.b_c-1", list(range(20)), _blocks(20), MESSAGES, {"k": 1})
    d = store.root / "agents" / FP.digest / "a.b_c-1"
    assert store.agent_dir("a.b_c-1") == d
    doc = json.loads((d / "manifest.json").read_text())
    assert doc["format_version"] == 2 and doc["agent"] == "a.b_c-1"
    assert doc["fingerprint"] == dict(FP.parts)
    assert doc["kv_format"] == {"bits": 4, "group_size": 64, "block_size": 16}
    assert doc["token_ids"] == list(range(20)) and doc["messages"] == MESSAGES
    assert [(b["start"], b["length"], b["sealed"]) for b in doc["blocks"]] == [
        (0, 16, True),
        (16, 4, False),
    ]
    for b in doc["blocks"]:
        data = (d / b["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == b["sha256"]
        assert b["file"] == f"b{b['start']:08d}-{b['sha256'][:16]}.safetensors"
    assert _files(d) == {"manifest.json", *(b["file"] for b in doc["blocks"])}
    for p in d.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    for p in (store.root, store.root / "agents", d.parent, d):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p


def test_incremental_save_keeps_sealed_files(store: AgentStore) -> None:
    layers = random_layers(FMT, 60, seed=4)
    first = split_into_blocks([x.slice(0, 20) for x in layers], 0, 16)
    m1 = store.save("a", range(20), first)
    d = store.agent_dir("a")
    sealed = d / m1.blocks[0].file
    before = sealed.stat()
    # grow the tail, with the same block objects ...
    grown = extend_blocks(first, [x.slice(20, 30) for x in layers], 16)
    m2 = store.save("a", range(30), grown)
    # ... and from a fresh store holding equal but new block objects
    other = AgentStore(store.root, FP, FMT)
    m3 = other.save("a", range(60), split_into_blocks(layers, 0, 16))
    after = sealed.stat()
    assert m2.blocks[0].file == m3.blocks[0].file == m1.blocks[0].file
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # files the manifest no longer names are gone
    assert _files(d) == {"manifest.json", *(b.file for b in m3.blocks)}
    assert m1.blocks[1].file not in _files(d) and m3.created == m1.created
    assert_blocks_equal(store.load("a").blocks, split_into_blocks(layers, 0, 16))


def test_truncation_inside_a_sealed_block(store: AgentStore) -> None:
    blocks = _blocks(40, seed=1)
    store.save("a", range(40), blocks)
    kept = blocks_for_prefix(blocks, 21)
    assert [(b.length, b.sealed) for b in kept] == [(16, True), (5, False)]
    store.save("a", range(21), kept)
    snap = store.load("a")
    assert snap.valid_tokens == 21
    assert_blocks_equal(snap.blocks, kept)
    assert len(_files(store.agent_dir("a"))) == 3
    # an empty cache (no blocks) is a valid state too
    store.save("a", [5, 6], [])
    snap = store.load("a")
    assert snap.blocks == [] and snap.valid_tokens == 0 and snap.token_ids == [5, 6]


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "-x", "a" * 129, "a b", "é"])
def test_invalid_agent_names_rejected(store: AgentStore, name: str) -> None:
    for call in (store.load, store.exists, store.delete, store.agent_dir, store.find_mismatched):
        with pytest.raises(InvalidAgentName):
            call(name)
    with pytest.raises(InvalidAgentName):
        store.save(name, [], [])
    assert issubclass(InvalidAgentName, EdgeInferError)


def test_save_validates_blocks(store: AgentStore) -> None:
    blocks = _blocks(40)
    with pytest.raises(ValueError, match="contiguous"):
        store.save("a", range(40), [blocks[0], blocks[2]])
    with pytest.raises(ValueError, match="start at 0"):
        store.save("a", range(40), blocks[1:])
    with pytest.raises(ValueError, match="ids"):
        store.save("a", range(39), blocks)
    with pytest.raises(ValueError, match="format"):
        AgentStore(store.root, FP, KVFormat(8, 64, 16)).save("a", range(40), blocks)
    assert not store.exists("a")


def test_fingerprint_mismatch_names_the_part(store: AgentStore) -> None:
    store.save("x", range(20), _blocks(20))
    mpath = store.agent_dir("x") / "manifest.json"
    doc = json.loads(mpath.read_text())
    doc["fingerprint"]["weights"] = "bbb"
    mpath.write_text(json.dumps(doc))
    with pytest.raises(FingerprintMismatch, match=r"agent 'x'.*differs in: weights") as err:
        store.load("x")
    assert err.value.differing == ["weights"]
    doc["fingerprint"]["weights"] = "aaa"
    doc["kv_format"]["block_size"] = 256
    mpath.write_text(json.dumps(doc))
    with pytest.raises(FingerprintMismatch, match="kv_format.block_size"):
        store.load("x")
    doc["format_version"] = 99
    mpath.write_text(json.dumps(doc))
    with pytest.raises(CacheVersionError, match="99"):
        store.load("x")


def test_find_mismatched_and_list_agents(tmp_path: Path) -> None:
    old = AgentStore(tmp_path, Fingerprint.of(**{**dict(FP.parts), "weights": "old"}), FMT)
    older = AgentStore(
        tmp_path, Fingerprint.of(**{**dict(FP.parts), "tokenizer": "x", "weights": "o"}), FMT
    )
    store = AgentStore(tmp_path, FP, FMT)
    old.save("coder", range(20), _blocks(20))
    older.save("coder", range(20), _blocks(20))
    older.save("reviewer", range(20), _blocks(20))
    assert store.load("coder") is None
    found = dict(store.find_mismatched("coder"))
    assert found == {
        old.fingerprint.digest: ["weights"],
        older.fingerprint.digest: ["tokenizer", "weights"],
    }
    assert store.find_mismatched("nobody") == []
    store.save("coder", range(33), _blocks(33))
    store.save("alpha", range(5), _blocks(5))
    infos = store.list_agents()
    assert [i.name for i in infos] == ["alpha", "coder"]
    coder = infos[1]
    assert (coder.tokens, coder.n_blocks) == (33, 3)
    assert coder.bytes_on_disk == sum(p.stat().st_size for p in store.agent_dir("coder").iterdir())
    assert coder.updated
    assert store.delete("coder") and not store.exists("coder") and not store.delete("coder")
    assert [i.name for i in store.list_agents()] == ["alpha"]
    assert [i.name for i in old.list_agents()] == ["coder"]


# -- corruption ------------------------------------------------------------------------


def _saved(store: AgentStore, n: int = 56):
    blocks = _blocks(n, seed=9)
    m = store.save("a", range(n), blocks, MESSAGES)
    return blocks, m, store.agent_dir("a")


def test_flipped_byte_keeps_only_the_valid_prefix(store: AgentStore, caplog) -> None:
    blocks, m, d = _saved(store)
    bad = d / m.blocks[1].file
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="edge_infer.cache"):
        snap = store.load("a")
    assert snap.valid_tokens == 16 and snap.token_ids == list(range(56))
    assert_blocks_equal(snap.blocks, blocks[:1])
    assert snap.quarantined == [b.file for b in m.blocks[1:]]
    assert set(os.listdir(d / "quarantine")) == set(snap.quarantined)
    assert not bad.exists()
    assert any("sha256 mismatch" in r.getMessage() for r in caplog.records)
    assert stat.S_IMODE((d / "quarantine").stat().st_mode) == 0o700
    # later loads only see the valid prefix; a save repairs the cache
    assert store.load("a").valid_tokens == 16
    store.save("a", range(56), blocks, MESSAGES)
    assert store.load("a").valid_tokens == 56


def test_missing_block_file(store: AgentStore, caplog) -> None:
    blocks, m, d = _saved(store)
    (d / m.blocks[2].file).unlink()
    with caplog.at_level(logging.WARNING, logger="edge_infer.cache"):
        snap = store.load("a")
    assert snap.valid_tokens == 32 and snap.quarantined == [m.blocks[3].file]
    assert_blocks_equal(snap.blocks, blocks[:2])
    assert any("missing" in r.getMessage() for r in caplog.records)


def test_truncated_first_block(store: AgentStore) -> None:
    _, m, d = _saved(store)
    p = d / m.blocks[0].file
    p.write_bytes(p.read_bytes()[:50])
    snap = store.load("a")
    assert snap.blocks == [] and snap.valid_tokens == 0 and len(snap.quarantined) == 4


@pytest.mark.parametrize(
    "text", ["{not json", "", "[]", '{"format_version": 1}', '{"format_version": "1"}']
)
def test_corrupt_manifest_is_quarantined(store: AgentStore, caplog, text: str) -> None:
    _, _, d = _saved(store)
    (d / "manifest.json").write_text(text)
    with caplog.at_level(logging.WARNING, logger="edge_infer.cache"):
        assert store.load("a") is None
    assert (d / "quarantine" / "manifest.json").read_text() == text
    assert not store.exists("a")
    assert any("manifest is corrupt" in r.getMessage() for r in caplog.records)
    store.save("a", range(3), _blocks(3))  # and the agent starts afresh
    assert store.load("a").valid_tokens == 3


def test_manifest_path_tricks_are_corruption(store: AgentStore) -> None:
    _, _, d = _saved(store)
    doc = json.loads((d / "manifest.json").read_text())
    doc["blocks"][0]["file"] = "../../../etc/passwd"
    (d / "manifest.json").write_text(json.dumps(doc))
    assert store.load("a") is None


def test_quarantine_keeps_every_corrupt_manifest(store: AgentStore) -> None:
    d = store.agent_dir("x")
    for _ in range(2):
        store.save("x", [1, 2], [])
        (d / "manifest.json").write_text("{not json")
        assert store.load("x") is None
    assert sorted(os.listdir(d / "quarantine")) == ["manifest.json", "manifest.json.1"]


# -- token ids bound to the KV -----------------------------------------------------------


def _edit_manifest(d: Path, edit) -> None:
    doc = json.loads((d / "manifest.json").read_text())
    edit(doc)
    (d / "manifest.json").write_text(json.dumps(doc))


def test_each_block_records_the_chain_of_its_token_ids(store: AgentStore) -> None:
    _, m, d = _saved(store)
    doc = json.loads((d / "manifest.json").read_text())
    chains = [b["token_chain"] for b in doc["blocks"]]
    assert chains == token_chains(list(range(56)), [(b.start, b.length) for b in m.blocks])
    assert len(set(chains)) == len(chains)
    for entry in m.blocks:  # the block file records it too, under its sha256
        _, chain = block_and_chain_from_bytes((d / entry.file).read_bytes())
        assert chain == entry.token_chain


@pytest.mark.parametrize("also_chain", [False, True])
def test_manifest_edited_to_claim_other_ids_drops_from_the_first_mismatch(
    store: AgentStore, caplog, also_chain: bool
) -> None:
    blocks, m, d = _saved(store)
    other = list(range(56))
    other[20] = 999  # inside block 1: blocks 1.. were computed from other ids

    def edit(doc: dict) -> None:
        doc["token_ids"] = other
        if also_chain:  # a careful editor recomputes the manifest's chains as well
            spans = [(b["start"], b["length"]) for b in doc["blocks"]]
            for b, c in zip(doc["blocks"], token_chains(other, spans), strict=True):
                b["token_chain"] = c

    _edit_manifest(d, edit)
    with caplog.at_level(logging.WARNING, logger="edge_infer.cache"):
        snap = store.load("a")
    assert snap.valid_tokens == 16 and snap.token_ids == other
    assert_blocks_equal(snap.blocks, blocks[:1])
    assert any("token ids differ" in r.getMessage() for r in caplog.records)


def test_a_version_1_manifest_keeps_its_conversation_and_recomputes_its_kv(
    store: AgentStore,
) -> None:
    blocks, _, d = _saved(store)

    def to_v1(doc: dict) -> None:
        doc["format_version"] = 1
        for b in doc["blocks"]:
            del b["token_chain"]

    _edit_manifest(d, to_v1)
    snap = store.load("a")
    assert snap.token_ids == list(range(56)) and snap.messages == MESSAGES
    assert snap.blocks == [] and snap.valid_tokens == 0 and snap.quarantined == []
    store.save("a", range(56), blocks, MESSAGES)
    assert store.load("a").valid_tokens == 56


def test_an_unknown_manifest_version_is_a_clear_error(store: AgentStore) -> None:
    _, _, d = _saved(store)
    _edit_manifest(d, lambda doc: doc.update(format_version=3))
    with pytest.raises(CacheVersionError, match="version 3 is not supported"):
        store.load("a")


# -- symbolic links ----------------------------------------------------------------------


def _outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir(exist_ok=True)
    return out


def test_a_linked_agent_folder_is_never_read_or_written(store: AgentStore, tmp_path) -> None:
    blocks, m, d = _saved(store)
    outside = _outside(tmp_path)
    os.rename(d, outside / "a")  # a folder someone moved out and linked back
    d.symlink_to(outside / "a")
    before = {p.name: p.read_bytes() for p in (outside / "a").iterdir()}
    with pytest.raises(UnsafeCachePath, match="symbolic link"):
        store.load("a")
    with pytest.raises(UnsafeCachePath, match="symbolic link"):
        store.save("a", range(56), blocks, MESSAGES)
    assert not store.exists("a") and store.list_agents() == []
    assert {p.name: p.read_bytes() for p in (outside / "a").iterdir()} == before
    assert store.delete("a") and not os.path.lexists(d)  # the link goes, not its target
    assert {p.name: p.read_bytes() for p in (outside / "a").iterdir()} == before


def test_a_linked_fingerprint_folder_is_refused(store: AgentStore, tmp_path) -> None:
    blocks, _, _ = _saved(store)
    outside = _outside(tmp_path)
    os.rename(store.base_dir, outside / "fp")
    store.base_dir.symlink_to(outside / "fp")
    with pytest.raises(UnsafeCachePath):
        store.save("b", range(16), blocks[:1])
    assert not (outside / "fp" / "b").exists()


def test_a_linked_quarantine_moves_nothing_outside(store: AgentStore, tmp_path, caplog) -> None:
    _, m, d = _saved(store)
    outside = _outside(tmp_path)
    (d / "quarantine").symlink_to(outside)
    (d / m.blocks[2].file).write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="edge_infer.cache"):
        snap = store.load("a")
    assert snap.valid_tokens == 32 and snap.quarantined == []
    assert list(outside.iterdir()) == []
    assert any("quarantine is a symbolic link" in r.getMessage() for r in caplog.records)


def test_linked_block_files_and_manifest_are_not_followed(store: AgentStore, tmp_path) -> None:
    _, m, d = _saved(store)
    outside = _outside(tmp_path)
    good = d / m.blocks[1].file
    os.rename(good, outside / good.name)  # the very bytes, but behind a link
    good.symlink_to(outside / good.name)
    snap = store.load("a")
    assert snap.valid_tokens == 16
    assert os.path.islink(d / "quarantine" / good.name)  # the link moved, not the target
    assert (outside / good.name).is_file()
    os.rename(d / "manifest.json", outside / "manifest.json")
    (d / "manifest.json").symlink_to(outside / "manifest.json")
    assert store.load("a") is None and not store.exists("a")
    assert (outside / "manifest.json").is_file()
    assert sorted(p.name for p in outside.iterdir()) == sorted([good.name, "manifest.json"])


def test_an_unverified_load_maps_the_files_and_corrupt_files_finds_bad_ones(
    store: AgentStore,
) -> None:
    from edge_infer.cache_store.blocks import maps_a_file

    blocks, m, d = _saved(store)
    snap = store.load("a", verify=False)
    assert not snap.verified and snap.files == [e.file for e in m.blocks]
    assert_blocks_equal(snap.blocks, blocks)
    assert all(maps_a_file(b.layers[0].keys.packed) for b in snap.blocks if b.sealed)
    assert store.load("a").verified
    assert store.corrupt_files("a") == []
    bad = d / m.blocks[1].file
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0x01  # tensor data: the header still parses, only the hash tells
    bad.write_bytes(bytes(data))
    assert store.load("a", verify=False).valid_tokens == 56  # not read: not noticed
    assert store.corrupt_files("a") == [m.blocks[1].file]
    assert store.load("a").valid_tokens == 16  # a verified load sets it aside
    assert store.corrupt_files("nobody") == []
    assert store.page_index_path("a").parent == d
