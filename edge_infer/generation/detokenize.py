"""Streaming text out of generated token ids, and cutting the stream at stop strings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["IncrementalDetokenizer", "StopMatcher"]

_REPLACEMENT = "\ufffd"


class _Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turns token ids, one at a time, into text pieces whose concatenation is the full decode.

    Only a short window of recent ids is decoded per token: the text of ``ids[prefix:]`` minus the
    text of ``ids[prefix:read]`` is what is new, which also keeps SentencePiece's leading-space
    handling right. A piece never ends inside a multi-byte character: while the decoded window
    ends in U+FFFD (a character whose bytes span tokens), its text is held back.
    """

    def __init__(self, tokenizer: _Decoder, skip_special: bool = False) -> None:
        """`tokenizer` needs ``decode(ids, skip_special)``; `skip_special` drops control tokens."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []  # the window: context ids, then ids not yet emitted
        self._read = 0  # ids[:read] are emitted context, ids[read:] are pending
        self._read_text = ""  # decode(ids[:read])

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special=self._skip_special) if ids else ""

    def add(self, token_id: int) -> str:
        """Append one id and return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if len(text) > len(self._read_text) and not text.endswith(_REPLACEMENT):
            return self._advance(text)
        return ""

    def flush(self) -> str:
        """Return whatever text is still held back (call once generation has ended)."""
        if self._read == len(self._ids):
            return ""
        return self._advance(self._decode(self._ids))

    def _advance(self, text: str) -> str:
        piece = text[len(self._read_text) :]
        # the ids just emitted become the next window's context; older ones are dropped
        del self._ids[: self._read]
        self._read = len(self._ids)
        self._read_text = self._decode(self._ids)
        return piece


class StopMatcher:
    """Cuts a text stream at the first occurrence of any stop string.

    ``feed`` returns the text that is safe to emit: a tail that could be the start of a stop
    string is held back until it is resolved, and once a stop string appears only the text
    before it is returned.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        """`stops`: the stop strings (a lone str counts as one); empty ones are ignored."""
        if isinstance(stops, str):
            stops = (stops,)
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        self._held = ""
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that matched

    def feed(self, text: str) -> tuple[str, bool]:
        """Take more text; return (text safe to emit, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        buffer = self._held + text
        if not self.stops:
            self._held = ""
            return buffer, False
        first: int | None = None
        for stop in self.stops:
            at = buffer.find(stop)
            if at >= 0 and (first is None or at < first):
                first, self.stop_string = at, stop
        if first is not None:
            self.stopped = True
            self._held = ""
            return buffer[:first], True
        hold = self._held_tail_length(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def _held_tail_length(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        for size in range(min(self._max_hold, len(buffer)), 0, -1):
            tail = buffer[-size:]
            if any(stop.startswith(tail) for stop in self.stops):
                return size
        return 0

    def flush(self) -> str:
        """Release the held-back tail at the end of the stream ("" after a stop)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held
