"""Shared helpers for the benchmarks: corpus text, passkey prompts, timing statistics, table
printing."""

from __future__ import annotations

import atexit
import json
import os
import platform
import shutil
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from pydoc_data.topics import topics


def corpus_text() -> str:
    """Real English text: the Python documentation topics that ship with CPython."""
    return "\n\n".join(topics[k] for k in sorted(topics))


PASSKEY_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n"
)
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass(frozen=True)
class PasskeyPrompt:
    """The classic passkey prompt as token pieces: ``before`` (intro and filler up to the key,
    the same for every key at one depth), the ``needle`` holding the key, the filler ``after``
    it and the ``question``."""

    key: int
    before: list[int]
    needle: list[int]
    after: list[int]
    question: list[int]

    @property
    def ids(self) -> list[int]:
        return self.before + self.needle + self.after + self.question


def passkey_prompt(
    encode: Callable[..., list[int]], tokens: int, depth: float, key: int, align: int = 1
) -> PasskeyPrompt:
    """A ``tokens``-token passkey prompt with ``key`` at ``depth`` (0..1) of it.

    ``encode(text, add_bos=...)`` is a tokenizer's: only the intro gets the model's BOS. The
    key starts on a multiple of ``align`` tokens, so that a cache of ``before`` can be cut
    back exactly to it (a block boundary) for the next key."""
    intro = encode(PASSKEY_INTRO)
    question = encode(PASSKEY_QUESTION, add_bos=False)
    needle = encode(PASSKEY_NEEDLE.format(key=key), add_bos=False)
    filler = encode(PASSKEY_FILLER * (tokens // 8 + 8), add_bos=False)
    body = tokens - len(intro) - len(needle) - len(question)
    if body <= align:
        raise ValueError(f"passkey prompt: {tokens} tokens leave no room for filler")
    cut = round((len(intro) + depth * body) / align) * align
    cut = min(max(cut, len(intro) + align - len(intro) % align), len(intro) + body)
    before = intro + filler[: cut - len(intro)]
    after = filler[cut - len(intro) : body]
    return PasskeyPrompt(key, before, needle, after, question)


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
