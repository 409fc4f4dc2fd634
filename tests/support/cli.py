"""Running the `edge-infer` command as a user does, and checking its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

EXE = [sys.executable, "-m", "edge_infer.cli.app"]


def run_cli(
    *args: str, stdin: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*EXE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
