"""Reading chat input: multi-line messages, slash commands, one-line previews."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from edge_infer.cli.chat_input import (
    CONTINUATION,
    PROMPT,
    Command,
    Entry,
    interpret,
    one_line,
    read_message,
)


def reader(*lines: str) -> tuple[Callable[[str], str], list[str]]:
    """A fake ``input``: returns ``lines`` in turn, then raises EOFError; records the prompts."""
    pending, prompts = list(lines), []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        if not pending:
            raise EOFError
        return pending.pop(0)

    return read, prompts


def test_one_line_message():
    read, prompts = reader("  hello there  ", "next")
    assert read_message(read) == Entry("hello there")
    assert prompts == [PROMPT]


def test_backslash_continues_the_line():
    read, prompts = reader("first \\", "second\\", "third", "next")
    assert read_message(read) == Entry("first \nsecond\nthird")
    assert prompts == [PROMPT, CONTINUATION, CONTINUATION]


def test_triple_quotes_wrap_a_block_keeping_indentation():
    read, prompts = reader('"""', "def f():", "    return 1", "", '"""', "next")
    assert read_message(read) == Entry("def f():\n    return 1", block=True)
    assert prompts == [PROMPT] + [CONTINUATION] * 4
    assert read_message(read) == Entry("next")


def test_block_text_may_share_the_marker_lines():
    read, _ = reader('"""first', "middle", 'last"""')
    assert read_message(read).text == "first\nmiddle\nlast"
    read, prompts = reader('"""all on one line"""')
    assert read_message(read) == Entry("all on one line", block=True)
    assert prompts == [PROMPT]


def test_a_block_keeps_backslashes_and_slashes():
    read, _ = reader('"""', "C:\\temp\\", "/not a command", '"""')
    entry = read_message(read)
    assert entry.text == "C:\\temp\\\n/not a command"
    assert interpret(entry) == entry.text  # a block is never a command


def test_end_of_input_ends_a_multiline_message_and_raises_on_the_first_line():
    read, _ = reader('"""', "unfinished")
    assert read_message(read).text == "unfinished"
    with pytest.raises(EOFError):
        read_message(read)
    read, _ = reader("dangling \\")
    assert read_message(read).text == "dangling"


def test_custom_prompts():
    read, prompts = reader("a\\", "b")
    assert read_message(read, "", "").text == "a\nb"
    assert prompts == ["", ""]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/help", Command("help")),
        ("/QUIT", Command("quit")),
        ("/switch  alice ", Command("switch", "alice")),
        (
            "/system You are terse.\nAnswer in French.",
            Command("system", "You are terse.\nAnswer in French."),
        ),
        ("/", Command("")),
        ("hello /help", "hello /help"),
        ("//etc/hosts is a file", "/etc/hosts is a file"),
        ("plain", "plain"),
    ],
)
def test_interpret_commands_and_messages(text, expected):
    assert interpret(Entry(text)) == expected


def test_one_line_collapses_whitespace_and_truncates():
    assert one_line("a\n\n b\tc ", 80) == "a b c"
    assert one_line("abcdefghij", 5) == "abcd…"
    assert one_line("abcde", 5) == "abcde"
    assert one_line("abc", 0) == ""
