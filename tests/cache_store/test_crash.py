"""Crash safety and concurrency of the agent store: SIGKILLed writers, racing processes/threads."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_infer.cache_store import AgentStore, CacheLockTimeout
from edge_infer.cache_store import store as store_module
from tests.support import REPO
from tests.support.cache_store_helpers import assert_blocks_equal
from tests.support.cache_store_writer import make_state, store_at

WRITER = REPO / "tests" / "support" / "cache_store_writer.py"


def _spawn(root: Path, agent: str, seed: int, first: int, count: int) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, str(WRITER), str(root), agent, str(seed), str(first), str(count)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def _check(store: AgentStore, agent: str, seed: int | None = None) -> int:
    """Load ``agent``, verify it is complete and exactly some state the writer made; its index.

    ``seed=None`` accepts either writer's states (the snapshot says whose it is).
    """
    with store.lock(agent):  # files and manifest must match what load() saw
        snap = store.load(agent)
        d = store.agent_dir(agent)
        manifest = json.loads((d / "manifest.json").read_text())
        for entry in manifest["blocks"]:
            assert hashlib.sha256((d / entry["file"]).read_bytes()).hexdigest() == entry["sha256"]
    assert snap is not None
    assert snap.quarantined == []
    assert snap.valid_tokens == sum(b["length"] for b in manifest["blocks"])
    if seed is not None:
        assert snap.extra["seed"] == seed
    k = snap.extra["iteration"]
    state = make_state(snap.extra["seed"], k)
    assert snap.token_ids == state.token_ids
    assert snap.messages == state.messages and snap.extra == state.extra
    assert_blocks_equal(snap.blocks, state.blocks)
    return k


def _leftovers(store: AgentStore, agent: str) -> set[str]:
    """Files in the agent folder besides the manifest and the blocks it names."""
    d = store.agent_dir(agent)
    named = {b["file"] for b in json.loads((d / "manifest.json").read_text())["blocks"]}
    return {p.name for p in d.iterdir()} - named - {"manifest.json"}


@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_a_committed_state(tmp_path: Path) -> None:
    seed, agent, rounds = 7, "crashy", 32
    store = store_at(tmp_path)
    rng = random.Random(20240607)
    last = None  # iteration on disk after the previous round
    first = 0
    for _ in range(rounds):
        proc = _spawn(tmp_path, agent, seed, first, 100_000)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.0, 0.12))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err
        done = [int(x) for x in re.findall(r"committed (\d+)", out)]
        # what is on disk is the last reported commit, or the save that was under way
        allowed = {done[-1], done[-1] + 1} if done else {last, first}
        if last is None and not done and store.load(agent) is None:
            continue
        last = _check(store, agent, seed)
        assert last in allowed
        first = (done[-1] if done else first) + 2
    assert last is not None and last > rounds  # the writers made real progress
    # the next save sweeps whatever a killed save left behind
    state = make_state(seed, first)
    store.save(agent, state.token_ids, state.blocks, state.messages, state.extra)
    assert _check(store, agent, seed) == first
    assert _leftovers(store, agent) == set()


class _Crash(Exception):
    pass


class _FaultAt:
    """Counts file operations of a save and raises on the ``n``-th (1-based)."""

    def __init__(self, n: int) -> None:
        self.n, self.count = n, 0
        self.real_write = store_module.write_atomic
        self.real_cleanup = AgentStore._remove_unreferenced

    def _tick(self) -> None:
        self.count += 1
        if self.count == self.n:
            raise _Crash

    def write(self, *args, **kw) -> None:
        self._tick()
        self.real_write(*args, **kw)

    def cleanup(self, *args) -> None:
        self._tick()
        self.real_cleanup(*args)


def test_failure_at_every_step_of_a_save(tmp_path: Path, monkeypatch) -> None:
    """In-process fault injection at each file operation: old or new state, never a mix."""
    seed, agent = 3, "faulty"
    for old_i, new_i in [(0, 1), (1, 2), (4, 5), (2, 9)]:
        for fail_at in range(1, 40):
            root = tmp_path / f"{old_i}-{new_i}-{fail_at}"
            store = store_at(root)
            old, new = make_state(seed, old_i), make_state(seed, new_i)
            store.save(agent, old.token_ids, old.blocks, old.messages, old.extra)
            fault = _FaultAt(fail_at)
            monkeypatch.setattr(store_module, "write_atomic", fault.write)
            monkeypatch.setattr(AgentStore, "_remove_unreferenced", staticmethod(fault.cleanup))
            try:
                store.save(agent, new.token_ids, new.blocks, new.messages, new.extra)
                crashed = False
            except _Crash:
                crashed = True
            monkeypatch.undo()
            k = _check(store_at(root), agent, seed)
            assert k in (old_i, new_i)
            if not crashed:
                assert k == new_i and fail_at > 3
                break
        else:
            pytest.fail("save never completed")


def _race_processes(root: Path, agent: str, seeds: tuple[int, int], count: int) -> None:
    procs = [_spawn(root, agent, s, 0, count) for s in seeds]
    store = store_at(root)
    seen = 0
    while any(p.poll() is None for p in procs):
        if store.exists(agent):  # readers take the lock too: always a whole state
            assert 0 <= _check(store, agent) < count
            seen += 1
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert out.count("committed") == count
    assert seen > 0
    assert _check(store, agent) == count - 1  # the last save of whoever saved last
    assert _leftovers(store, agent) == set()


def test_two_processes_save_the_same_agent(tmp_path: Path) -> None:
    _race_processes(tmp_path, "shared", (101, 202), 60)


def test_two_threads_save_the_same_agent(tmp_path: Path) -> None:
    agent, count, seeds = "threaded", 25, (11, 22)
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(seed: int) -> None:
        store = store_at(tmp_path)  # one store per thread: the lock is per path, not object
        try:
            for i in range(count):
                s = make_state(seed, i)
                store.save(agent, s.token_ids, s.blocks, s.messages, s.extra)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    def reader() -> None:
        store = store_at(tmp_path)
        try:
            while not stop.is_set():
                if store.exists(agent):
                    _check(store, agent)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(s,)) for s in seeds]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads[:2]:
        t.join()
    stop.set()
    threads[2].join()
    assert not errors, errors
    store = store_at(tmp_path)
    assert _check(store, agent) == count - 1
    assert _leftovers(store, agent) == set()


def test_lock_serializes_and_is_reentrant(tmp_path: Path) -> None:
    store = store_at(tmp_path)
    order: list[str] = []

    def other() -> None:
        with store_at(tmp_path).lock("a"):
            order.append("thread")

    with store.lock("a"):
        with store.lock("a"):  # re-entrant within a thread
            t = threading.Thread(target=other)
            t.start()
            time.sleep(0.1)
            order.append("main")
    t.join(timeout=10)
    assert order == ["main", "thread"]


def test_lock_holds_across_processes(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "from tests.support.cache_store_writer import store_at\n"
        "with store_at(sys.argv[1]).lock('a'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        store = store_at(tmp_path)
        with pytest.raises(CacheLockTimeout):
            with store.lock("a", timeout=0.2):
                pass
        with store.lock("b", timeout=0.2):  # other agents are free
            pass
    finally:
        proc.kill()
        proc.wait()
    with store.lock("a", timeout=10):  # a dead holder's lock is released by the kernel
        pass
