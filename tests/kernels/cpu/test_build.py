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
