"""`edge-infer chat` as a user drives it: a real process on a pseudo-terminal, the real model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.cli import assert_one_line_error, run_cli
from tests.support.vision_images import synthetic
from tests.support.vision_models import llava_user_dir
from tests.support.vision_plan import kept_tokens

pexpect = pytest.importorskip("pexpect")

EXE = [sys.executable, "-m", "edge_infer.cli.app"]
CHAT = ["chat", "--backend", "torch", "--temperature", "0"]
PROMPT = ">>> "
STATUS = re.compile(r"prompt (\d+) tok · reused (\d+) · TTFT \d+ ms · [\d.]+ tok/s")


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of this test's own, for the chat processes and this process alike."""
    path = tmp_path / "cache"
    monkeypatch.setenv("EDGE_INFER_CACHE_DIR", str(path))
    return path


def child_env(cache_dir: Path, term: str = "dumb") -> dict[str, str]:
    return {**os.environ, "EDGE_INFER_CACHE_DIR": str(cache_dir), "COLUMNS": "200", "TERM": term}


def spawn(
    cache_dir: Path,
    *args: str,
    max_tokens: int = 16,
    term: str = "dumb",
    sigint_ignored: bool = False,
) -> pexpect.spawn:
    """The chat in a terminal; ``sigint_ignored``: started as a background job of a script
    is (SIGINT ignored, which the process inherits)."""
    child = pexpect.spawn(
        EXE[0],
        [*EXE[1:], *CHAT, "--max-tokens", str(max_tokens), "--agent", "alice", *args],
        env=child_env(cache_dir, term),
        encoding="utf-8",
        timeout=120,
        dimensions=(50, 200),
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        if sigint_ignored
        else None,
    )
    child.expect_exact(PROMPT)
    return child


def ask(child: pexpect.spawn, text: str) -> tuple[int, int]:
    """Send a message, wait for its status line and the next prompt: (prompt, reused) tokens."""
    child.sendline(text)
    child.expect(STATUS)
    prompt, reused = int(child.match.group(1)), int(child.match.group(2))
    child.expect_exact(PROMPT)
    return prompt, reused


def command(child: pexpect.spawn, text: str) -> str:
    """Run a slash command; its output up to the next prompt (input echo dropped)."""
    child.sendline(text)
    child.expect_exact(PROMPT)
    return child.before.replace("\r\n", "\n").split("\n", 1)[-1]


def finish(child: pexpect.spawn) -> None:
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before


def words(text: str) -> str:
    """Terminal output as plain words: no escape sequences, no echoed ^C."""
    return " ".join(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("^C", "").split())


def run_piped(cache_dir: Path, stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*EXE, *CHAT, "--max-tokens", "16", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(cache_dir),
    )


@pytest.mark.slow
def test_conversation_and_its_kv_cache_survive_a_restart(cache_dir):
    child = spawn(cache_dir)
    prompt, reused = ask(child, "My name is Bob. What is 2+2?")
    assert prompt > 0 and reused == 0
    child.sendline("/quit")
    child.expect(r"saved agent 'alice' \((\d+) tokens\)")
    first_tokens = int(child.match.group(1))
    finish(child)

    child = spawn(cache_dir)  # the history was shown before the prompt came
    history = child.before
    assert "(2 earlier messages)" in history
    assert "user: My name is Bob. What is 2+2?" in history
    assert f"continuing agent 'alice' ({first_tokens} tokens cached)" in history
    prompt, reused = ask(child, "What is my name?")
    # the first turn's keys and values came from disk, not from a new prefill
    assert 0 < reused <= first_tokens < prompt
    child.sendeof()  # Ctrl-D saves and leaves too
    child.expect(r"saved agent 'alice' \((\d+) tokens\)")
    second_tokens = int(child.match.group(1))
    finish(child)
    assert second_tokens > first_tokens

    proc = run_piped(cache_dir, "/stats\n", "--agent", "alice")
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"cached\s+{second_tokens} tokens", proc.stdout), proc.stdout
    assert re.search(r"messages\s+4\b", proc.stdout), proc.stdout


@pytest.mark.slow
def test_slash_commands(cache_dir):
    child = spawn(cache_dir)
    ask(child, "Hi!")
    assert "no system prompt" in command(child, "/system")
    assert "system prompt set" in command(child, "/system You are a pirate.")
    assert "system: You are a pirate." in command(child, "/system")

    assert "forked 'alice' into 'bob2'" in command(child, "/fork bob2")
    table = command(child, "/agents")
    assert re.search(r"^\s+alice\s+\d+\s+3\s", table, re.M), table
    assert re.search(r"^\s*\*\s+bob2\s+\d+\s+3\s", table, re.M), table
    assert "already exists" in command(child, "/fork alice")

    out = command(child, "/switch alice")
    assert "switched to agent 'alice'" in out and "user: Hi!" in out
    assert "(system prompt kept)" in command(child, "/reset")
    stats = command(child, "/stats")
    assert re.search(r"agent\s+alice", stats) and re.search(r"cached\s+0 tokens", stats)
    assert re.search(r"messages\s+1\b", stats), stats  # only the system prompt is left

    assert "unknown command '/frobnicate'" in command(child, "/frobnicate now")
    out = command(child, "/switch no spaces allowed")
    assert "error: invalid agent name" in out and "Traceback" not in out
    assert "usage: /switch NAME" in command(child, "/switch")
    help_text = command(child, "/help")
    for name in ("/agents", "/switch NAME", "/fork NAME", "/reset", "/system", "/stats", "/save"):
        assert name in help_text
    child.sendline("/exit")
    child.expect_exact("saved agent 'alice'")
    child.expect_exact("saved agent 'bob2'")
    finish(child)


@pytest.mark.slow
def test_ctrl_c_stops_an_answer_and_keeps_the_cache_consistent(cache_dir):
    question = "Write a long story about a dragon who learns to cook."
    child = spawn(cache_dir, max_tokens=400, term="xterm")  # a real terminal: with spinner
    child.sendline(question)
    child.expect_exact(question + "\r\n")
    child.expect(r"\w+ \w+ \w+")  # the answer is coming
    child.sendintr()
    shown = child.before + child.after
    child.expect_exact("[stopped]")
    shown += child.before
    child.expect(STATUS)
    child.expect_exact(PROMPT)
    child.sendline("What is the capital of France?")
    child.expect_exact("Paris")
    child.expect(STATUS)
    child.expect_exact(PROMPT)
    child.sendintr()  # at the prompt: a fresh prompt
    child.expect_exact(PROMPT)
    child.sendline("/quit")
    finish(child)

    from edge_infer.engine import Engine

    agent = Engine.load(backend="torch").agent("alice")
    messages = agent.messages
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    partial = messages[1]["content"]
    assert 0 < len(partial) < 1000
    assert words(shown).endswith(words(partial))  # what was shown is what was kept
    assert "Paris" in messages[3]["content"]
    tokens = agent.tokens
    agent.chat("Thanks!", max_tokens=2, temperature=0)
    assert tokens - 2 <= agent.usage.cached_tokens <= tokens


def test_piped_input_without_a_terminal(cache_dir):
    too_long = "word " * 9000  # more tokens than the model's context: an error, then go on
    proc = run_piped(cache_dir, f'{too_long}\nHello\n"""\n/not a command\n"""\n/quit\n')
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and PROMPT not in proc.stdout
    assert proc.stderr.startswith("error: the conversation needs") and proc.stderr.count("\n") == 1
    assert "agent 'default'" in proc.stdout
    assert len(STATUS.findall(proc.stdout)) == 2
    assert "saved agent 'default'" in proc.stdout


def test_bad_agent_name_at_start_is_one_line(cache_dir):
    proc = run_piped(cache_dir, "", "--agent", "no/slashes")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: invalid agent name")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_images_by_flag_and_by_command_on_a_vlm(cache_dir, tmp_path):
    pytest.importorskip("transformers")
    vlm = tmp_path / "vlm"
    llava_user_dir(vlm)
    synthetic(41, 57, seed=9).save(tmp_path / "pic.png")
    synthetic(30, 20, seed=4).save(tmp_path / "other.png")
    (tmp_path / "junk.png").write_text("not an image")
    k1, t1 = kept_tokens(vlm, tmp_path / "pic.png", "hired", 0.5)
    k2, t2 = kept_tokens(vlm, tmp_path / "other.png", "hired", 0.5)
    stdin = (
        f"what is it?\n/image {tmp_path}/missing.png\n/image {tmp_path}/junk.png\n"
        f"/image {tmp_path}/other.png\n/image\nand this one?\n/quit\n"
    )
    args = ["-m", str(vlm), "--kv-bits", "16", "--visual-budget", "0.5"]
    proc = run_piped(cache_dir, stdin, *args, "--image", str(tmp_path / "pic.png"))
    assert proc.returncode == 0, proc.stderr
    notes = re.findall(r"reused \d+ · image (\d+)/(\d+) tok kept · TTFT", proc.stdout)
    # the second turn's prompt holds both images: the first read from the cache
    assert notes == [(str(k1), str(t1)), (str(k1 + k2), str(t1 + t2))], proc.stdout
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "missing.png: no such image file (nothing attached)" in errors[0]
    assert "junk.png: not an image" in errors[1]
    assert "attached other.png (20x30) to the next message" in proc.stdout
    assert f"attached to the next message: {tmp_path}/other.png" in proc.stdout


def test_images_on_a_text_model_or_missing_are_clear_errors(cache_dir, tmp_path):
    missing = run_cli(*CHAT, "--image", str(tmp_path / "nope.png"), stdin="")
    assert_one_line_error(missing, "nope.png: no such image file")
    synthetic(8, 8).save(tmp_path / "pic.png")
    proc = run_piped(cache_dir, f"/image {tmp_path}/pic.png\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    assert "text-only model" in proc.stderr and proc.stderr.count("\n") == 1


def test_ctrl_c_at_the_prompt_works_when_started_with_sigint_ignored(cache_dir):
    child = spawn(cache_dir, sigint_ignored=True)
    child.sendintr()
    child.expect_exact(PROMPT)  # a fresh prompt, not an ignored key
    prompt, _ = ask(child, "Hi")
    assert prompt > 0
    child.sendeof()
    child.expect(pexpect.EOF)


def test_kv_memory_offloads_an_agent_and_the_listing_shows_where_its_kv_is(cache_dir):
    # a budget below one block of KV: the agent goes to the pool and disk at once
    child = spawn(cache_dir, "--kv-memory", "64KB")
    long = " ".join(f"word{i}" for i in range(300))
    ask(child, f"Repeat after me: {long}")
    table = command(child, "/agents")
    assert re.search(r"KV in pool\s+KV on disk\s+hit rate", table), table
    assert re.search(r"^\s*\*\s+alice\s+\d+\s+2\s.*\d+%\s*$", table, re.M), table
    child.sendline("/exit")
    child.expect_exact("saved agent 'alice'")
    finish(child)


def test_a_bad_kv_memory_is_one_line():
    proc = run_cli("chat", "--kv-memory", "lots")
    assert_one_line_error(proc, "kv_memory", "256MB")
