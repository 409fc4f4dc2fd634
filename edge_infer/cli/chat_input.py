"""Reading chat input: multi-line messages and slash commands (no terminal or model here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

PROMPT = ">>> "
CONTINUATION = "... "
BLOCK = '"""'


@dataclass(frozen=True)
class Command:
    """A slash command: ``/name arg``."""

    name: str
    arg: str = ""


@dataclass(frozen=True)
class Entry:
    """What the user typed for one message; a triple-quoted block is always sent as it is."""

    text: str
    block: bool = False


def read_message(
    read_line: Callable[[str], str], prompt: str = PROMPT, continuation: str = CONTINUATION
) -> Entry:
    """Read one message with ``read_line(prompt)`` (``input``, say).

    A line ending with a backslash continues on the next line; a line starting with ``\"\"\"``
    opens a block that runs until a line ending with ``\"\"\"``. End of input on the first line
    raises ``EOFError``; inside a multi-line message it ends the message. The text comes back
    without surrounding blank lines (a block keeps its indentation).
    """
    first = read_line(prompt)
    if first.lstrip().startswith(BLOCK):
        return Entry(_read_block(first.lstrip()[len(BLOCK) :], read_line, continuation), True)
    lines = [first]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(read_line(continuation))
        except EOFError:
            break
    return Entry("\n".join(lines).strip())


def _read_block(rest: str, read_line: Callable[[str], str], continuation: str) -> str:
    lines: list[str] = []
    line = rest
    while not line.rstrip().endswith(BLOCK):
        lines.append(line)
        try:
            line = read_line(continuation)
        except EOFError:
            return _trim_blank_lines(lines)
    lines.append(line.rstrip()[: -len(BLOCK)])
    return _trim_blank_lines(lines)


def _trim_blank_lines(lines: list[str]) -> str:
    lines = [ln.rstrip() for ln in lines]
    while lines and not lines[0]:
        lines.pop(0)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def interpret(entry: Entry) -> Command | str:
    """A slash command, or the message to send (``//text`` sends ``/text``)."""
    text = entry.text
    if entry.block or not text.startswith("/"):
        return text
    if text.startswith("//"):
        return text[1:]
    parts = text[1:].split(maxsplit=1)
    if not parts:
        return Command("")
    return Command(parts[0].lower(), parts[1].strip() if len(parts) > 1 else "")


def one_line(text: str, width: int) -> str:
    """``text`` on one line (whitespace collapsed), cut to ``width`` characters with '…'."""
    flat = " ".join(text.split())
    if width < 1:
        return ""
    return flat if len(flat) <= width else flat[: width - 1] + "…"
