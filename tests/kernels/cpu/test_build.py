"""Building the CPU kernels: a build killed midway never blocks later loads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edge_infer.kernels import cpu

ROOT = Path(__file__).resolve().parents[3]

# holds the build lock and leaves torch's lock file, as a builder in the middle of a build
HOLDER = """
import sys
from pathlib import Path
from edge_infer.kernels.cpu import build_lock
folder = Path(sys.argv[1])
with build_lock(folder):
    (folder / "lock").touch()
    print("building", flush=True)
    sys.stdin.readline()
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_a_stale_torch_lock_file_goes_when_the_build_lock_is_taken(tmp_path):
    (tmp_path / "lock").touch()
    with cpu.build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_builder_killed_midway_leaves_nothing_that_blocks(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env(),
    )
    try:
        assert holder.stdout.readline().strip() == "building"
        import fcntl

        with open(tmp_path / "build.flock", "a") as f:  # held while the builder lives
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        holder.kill()
    assert (tmp_path / "lock").exists()  # what torch's builder leaves when killed
    with cpu.build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_load_goes_on_past_a_stale_lock_file_in_the_build_folder():
    """End to end, in a new process, in the kernel folder the suite uses (built once), with a
    stale ``lock`` in it (the subprocess timeout guards against the hang this prevents)."""
    script = (
        "import sys\n"
        "from edge_infer.kernels import cpu\n"
        "folder = cpu.build_folder()\n"
        "folder.mkdir(parents=True, exist_ok=True)\n"
        "(folder / 'lock').touch()\n"
        "cpu.load()\n"
        "print('loaded', (folder / 'lock').exists())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env(),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "loaded False"


def test_sources_are_compiled_from_a_copy_named_by_their_content(tmp_path):
    sources = cpu.copy_sources(tmp_path)
    assert [s.name for s in sources] == [s.name for s in cpu.SOURCES]
    for ours, copy in zip(cpu.SOURCES, sources, strict=True):
        assert copy.parent == tmp_path / "src" and copy.read_bytes() == ours.read_bytes()
    headers = sorted(p.name for p in Path(cpu.__file__).parent.glob("*.h"))
    assert headers and all((tmp_path / "src" / h).is_file() for h in headers)
    # an unchanged copy is not rewritten (the builder would see a new file), a changed one is
    before = {p: p.stat().st_mtime_ns for p in sources}
    sources[0].write_text("// edited\n")
    os.utime(sources[1], ns=(1, 1))
    before[sources[1]] = 1
    cpu.copy_sources(tmp_path)
    assert sources[0].read_bytes() == cpu.SOURCES[0].read_bytes()
    assert sources[1].stat().st_mtime_ns == before[sources[1]]


def test_a_second_checkout_of_the_same_code_loads_the_module_without_rebuilding(tmp_path):
    """Another copy of the package (a second checkout, a reinstall) finds the module built from
    the same sources: nothing is compiled again."""
    import shutil

    shutil.copytree(ROOT / "edge_infer", tmp_path / "edge_infer")
    script = (
        "from edge_infer.kernels import cpu\n"
        "assert cpu.load() is not None\n"
        "print(cpu.build_folder())\n"
    )
    first = subprocess.run(
        [sys.executable, "-c", script], env=env(), capture_output=True, text=True, timeout=1800
    )
    assert first.returncode == 0, first.stderr
    folder = Path(first.stdout.strip())
    built = {p: p.stat().st_mtime_ns for p in folder.glob("*.so")}
    other = {**os.environ, "PYTHONPATH": str(tmp_path)}
    second = subprocess.run(
        [sys.executable, "-c", script], env=other, capture_output=True, text=True, timeout=1800
    )
    assert second.returncode == 0, second.stderr
    assert Path(second.stdout.strip()) == folder
    ninja = (folder / "build.ninja").read_text()
    assert str(folder / "src") in ninja and str(tmp_path) not in ninja
    assert built and {p: p.stat().st_mtime_ns for p in folder.glob("*.so")} == built
    assert "building" not in second.stderr
