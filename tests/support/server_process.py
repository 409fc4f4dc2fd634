"""Start a real ``edge-infer serve`` process on a free loopback port for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

EXE = [sys.executable, "-m", "edge_infer.cli.app"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    starting: list[int] = field(default_factory=list)  # /health statuses while starting

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait: the exit code (the server flushes caches first)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@contextmanager
def running_server(cache_dir: Path, *args: str, timeout: float = 180) -> Iterator[Server]:
    """A server on the embedded model (torch backend) storing caches under ``cache_dir``."""
    port = free_port()
    log = cache_dir.parent / f"server-{port}.log"
    env = {**os.environ, "EDGE_INFER_CACHE_DIR": str(cache_dir), "COLUMNS": "200"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*EXE, "serve", "--backend", "torch", "--port", str(port), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
            try:
                server.starting.append(httpx.get(f"{server.url}/health", timeout=2).status_code)
                if server.starting[-1] == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{server.output()}")
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
