"""Agents over a host-memory budget for KV: offloaded (layers past the first two in the pool
and on disk), answering as agents held in memory, resumed from their mapped block files and
page index, and refused clearly where offloading cannot apply."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from edge_infer import Engine
from edge_infer.cache_store.blocks import maps_a_file
from tests.support.sparse_runs import real_ids

GREEDY = {"temperature": 0, "max_tokens": 8}


def engine(cache_dir: Path, monkeypatch, **kwargs) -> Engine:
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(cache_dir))
    return Engine.load(**kwargs)


def digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob("b*.safetensors"))
    }


@pytest.fixture(scope="module")
def long_text(default_model):
    ids = real_ids(default_model.tokenizer, 1200)
    return default_model.tokenizer.decode(ids.tolist())


@pytest.mark.slow
def test_an_agent_over_the_budget_is_offloaded_answers_as_in_memory_and_resumes(
    long_text, tmp_path, monkeypatch
):
    question = "Summarize that in one sentence."
    # every page attended: offloading changes where the KV is, not what attention reads
    held = engine(tmp_path / "held", monkeypatch)
    want = [held.agent("a").chat(long_text, **GREEDY), held.agent("a").chat(question, **GREEDY)]

    eng = engine(tmp_path / "off", monkeypatch, kv_memory="1MB", kv_sparsity=1.0)
    agent = eng.agent("a")
    assert agent.chat(long_text, **GREEDY) == want[0]
    st = eng.agent_manager.state("a")
    assert st.tiers is not None and st.tiers.length >= 1024
    pool = st.tiers.pool
    assert pool.peak_bytes <= pool.budget_bytes == 1 << 20
    (info,) = [i for i in eng.agents() if i.name == "a"]
    assert info.offloaded and info.kv_disk_bytes > 0 and info.hit_rate is not None
    eng.flush()
    folder = eng.agent_manager.store.agent_dir("a")
    index_file = eng.agent_manager.store.page_index_path("a")
    assert index_file.is_file()
    before = digests(folder)

    # a new process: the blocks are mapped, not read, and the page index is reused
    again = engine(tmp_path / "off", monkeypatch, kv_memory="1MB", kv_sparsity=1.0)
    assert again.agent("a").chat(question, **GREEDY) == want[1]
    st = again.agent_manager.state("a")
    assert st.tiers is not None and st.sparse is not None
    first = st.blocks[0].layers[0].keys
    assert maps_a_file(first.packed)
    again.flush()
    after = digests(folder)
    kept = set(before) & set(after)  # the sealed blocks (the float16 tail block changed)
    assert len(kept) >= 4 and all(after[k] == before[k] for k in kept)  # none rewritten


@pytest.mark.slow
def test_a_stale_or_corrupt_page_index_is_rebuilt(long_text, tmp_path, monkeypatch):
    eng = engine(tmp_path, monkeypatch, kv_memory="1MB", kv_sparsity=0.5)
    reply = eng.agent("a").chat(long_text, **GREEDY)
    eng.flush()
    index_file = eng.agent_manager.store.page_index_path("a")
    good = index_file.read_bytes()
    for bad in (b"not an index", good[: len(good) // 2]):
        index_file.write_bytes(bad)
        other = engine(tmp_path, monkeypatch, kv_memory="1MB", kv_sparsity=0.5)
        name = "b" if bad == b"not an index" else "c"
        other.agent_manager.fork("a", name)
        other.flush()
        # the fork reads the same KV: its first turn answers as the original's would
        assert other.agent(name).chat("And then?", **GREEDY) == other.agent("a").chat(
            "And then?", **GREEDY
        )
        st = other.agent_manager.state("a")
        assert st.sparse is not None and st.sparse.index.covered() >= 1024
        other.flush()
        assert index_file.read_bytes() != bad  # written again, whole
    assert reply


def test_offloading_is_refused_up_front_where_it_cannot_apply(tmp_path, monkeypatch):
    eng = engine(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="kv_memory"):
        eng.agent("x", offload=True)
    with pytest.raises(ValueError, match="kv_memory"):
        Engine.load(kv_memory="lots")
    with pytest.raises(ValueError, match="kv_sparsity"):
        Engine.load(kv_memory="1MB", kv_sparsity=0)
    with pytest.raises(ValueError, match="kv_memory"):
        Engine.load(kv_sparsity=0.5)
    with pytest.raises(ValueError, match="torch backend"):
        Engine.load(kv_memory="1MB", backend="mlx")


@pytest.mark.slow
def test_an_agent_under_the_budget_stays_in_memory_unless_asked(long_text, tmp_path, monkeypatch):
    eng = engine(tmp_path, monkeypatch, kv_memory="1GB")
    small = eng.agent("small")
    small.chat("Hello there.", **GREEDY)
    assert eng.agent_manager.state("small").tiers is None
    forced = eng.agent("forced", offload=True)
    forced.chat("Hello there.", **GREEDY)
    assert eng.agent_manager.state("forced").tiers is not None
    (info,) = [i for i in eng.agents() if i.name == "forced"]
    assert info.offloaded
    assert np.isfinite(info.hit_rate)


@pytest.mark.slow
def test_a_block_file_that_fails_its_hash_after_a_mapped_resume_is_set_aside(
    long_text, tmp_path, monkeypatch
):
    import time

    from edge_infer.offload.index import PageIndex

    eng = engine(tmp_path, monkeypatch, kv_memory="1MB")
    eng.agent("a").chat(long_text, **GREEDY)
    eng.flush()
    store = eng.agent_manager.store
    folder = store.agent_dir("a")
    # the saved page index covers the sealed blocks a resume maps
    files = store.load("a").files
    index = PageIndex.load(store.page_index_path("a"), files, 30, 32, 256)
    assert index is not None and index.covered() == 4 * 256
    victim = sorted(folder.glob("b00000512-*.safetensors"))[0]
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data: the header still parses
    victim.write_bytes(bytes(data))

    again = engine(tmp_path, monkeypatch, kv_memory="1MB")
    st = again.agent_manager.state("a")  # mapped unverified; hashed on a thread
    deadline = time.monotonic() + 60
    while not st.suspect and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st.suspect
    again.agent("a").chat("And then?", **GREEDY)
    assert (folder / "quarantine" / victim.name).is_file()
    assert not st.suspect
