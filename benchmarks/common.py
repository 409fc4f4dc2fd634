"""Shared helpers for the benchmarks: corpus text, timing statistics, table printing."""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from pydoc_data.topics import topics


def corpus_text() -> str:
    """Real English text: the Python documentation topics that ship with CPython."""
    return "\n\n".join(topics[k] for k in sorted(topics))


def summarize(samples: Sequence[float]) -> tuple[float, float]:
    """(median, best) of throughput samples."""
    return statistics.median(samples), max(samples)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain-text table that reads well in a terminal and in a note."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    print(line)
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


def write_results(path, results: object) -> None:
    """Save results (with the machine they came from) as JSON, if a path was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


def temporary_dir(prefix: str) -> Path:
    """A new temporary folder, removed (with what was written in it) when the process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path
