"""The scripts in examples/ run as documented."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.support import REPO
from tests.support.server_process import running_server

ROOT = REPO

pytestmark = pytest.mark.slow


def test_agents_example_continues_on_the_second_run(tmp_path):
    env = {**os.environ, "EDGE_INFER_CACHE_DIR": str(tmp_path), "EDGE_INFER_BACKEND": "torch"}
    runs = [
        subprocess.run(
            [sys.executable, str(ROOT / "examples" / "agents.py")],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert "turn 1 (writer holds 0 tokens" in runs[0].stdout
    second = runs[1].stdout
    assert "turn 2" in second
    reused = [int(n) for n in re.findall(r"(\d+) from cache", second)]
    assert reused[0] > 0 and reused[1] > 0  # writer and critic restored from disk


def test_openai_client_example_against_a_running_server(tmp_path):
    with running_server(tmp_path / "cache") as srv:
        r = subprocess.run(
            [sys.executable, str(ROOT / "examples" / "openai_client.py")],
            capture_output=True,
            text=True,
            env={**os.environ, "EDGE_INFER_URL": f"{srv.url}/v1"},
            timeout=600,
        )
    assert r.returncode == 0, r.stderr
    reused = [int(n) for n in re.findall(r"(\d+) reused from the agent's cache", r.stdout)]
    assert len(reused) == 2 and reused[0] == 0 and reused[1] > 0
