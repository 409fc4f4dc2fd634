"""Run a function in a forked child with its address space and its time bounded.

For code that reads untrusted input: a case that asks for unbounded memory fails inside the
child (MemoryError) instead of swapping the machine, and one that hangs is killed.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def run_bounded(
    fn: Callable[[], Any], extra_memory: int = 512 << 20, seconds: float = 10.0
) -> dict[str, Any]:
    """``fn()`` in a child allowed ``extra_memory`` bytes of address space beyond what this
    process maps now, for ``seconds``. Returns ``{"outcome": "returned", "value": str}``,
    ``{"outcome": "raised", "type", "bases", "message", "traceback"}`` or
    ``{"outcome": "killed", "reason"}``."""
    limit = _vm_bytes() + extra_memory
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        os.close(read_end)
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            signal.alarm(int(seconds) + 1)  # a backstop if the parent is gone
            try:
                result = {"outcome": "returned", "value": str(fn())[:20000]}
            except BaseException as exc:  # report whatever it was
                result = {
                    "outcome": "raised",
                    "type": type(exc).__name__,
                    "bases": [c.__name__ for c in type(exc).__mro__],
                    "message": str(exc)[:20000],
                    "traceback": traceback.format_exc()[-4000:],
                }
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + seconds
    status = None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.005)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        return {"outcome": "killed", "reason": f"still running after {seconds} s"}
    chunks = []
    while chunk := os.read(read_end, 1 << 16):
        chunks.append(chunk)
    os.close(read_end)
    if not chunks:
        return {
            "outcome": "killed",
            "reason": f"child ended without a result (status {status}; out of memory?)",
        }
    return json.loads(b"".join(chunks))
