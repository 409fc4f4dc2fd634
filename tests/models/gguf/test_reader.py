"""GGUF headers that lie: every value is checked against the file and sane bounds before it
sizes anything, and the answer is one line naming the file and the field.

Each case runs in a forked child with a bounded address space and a time limit, so a header
that asks for terabytes fails there instead of on the machine.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_infer.errors import EdgeInferError
from edge_infer.models.catalog import describe
from edge_infer.models.loader import load_model
from tests.support import gguf_bytes as g
from tests.support.bounded import run_bounded

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux")


def _load_case(path: Path) -> dict[str, Any]:
    """In the child: the catalog describes the file without raising; loading it either works
    or raises one of our errors."""
    info = describe(path)
    try:
        load_model(path)
    except EdgeInferError as exc:
        return {"error": str(exc)[:2000], "type": type(exc).__name__, "listed": info.error}
    return {"error": None, "listed": info.error}


def load_bounded(path: Path) -> dict[str, Any]:
    """The case's result; fails the test for any other exception, a hang or a memory blow-up."""
    got = run_bounded(lambda: json.dumps(_load_case(path)), extra_memory=1 << 30, seconds=20)
    assert got["outcome"] == "returned", got
    result = json.loads(got["value"])
    if result["error"] is not None:
        message = result["error"]
        assert "\n" not in message and len(message) < 600, message
        assert str(path) in message, message
    return result


def _write(tmp: Path, data: bytes, name: str = "m.gguf") -> Path:
    path = tmp / name
    path.write_bytes(data)
    return path


def test_the_tiny_model_loads(tmp_path: Path) -> None:
    assert load_bounded(_write(tmp_path, g.to_bytes(g.tiny_llama())))["error"] is None


def _with(key: str, vtype: int, value: Any) -> g.Header:
    h = g.tiny_llama()
    h.set(key, vtype, value)
    return h


CASES = {
    "block_count 2^31": (_with("llama.block_count", g.U32, 2**31), "llama.block_count"),
    "context_length 2^40": (_with("llama.context_length", g.U64, 2**40), "context_length"),
    "head_count 0": (_with("llama.attention.head_count", g.U32, 0), "head_count"),
    "head_count_kv 0": (_with("llama.attention.head_count_kv", g.U32, 0), "head_count_kv"),
    "embedding_length 0": (_with("llama.embedding_length", g.U32, 0), "embedding_length"),
    "vocab_size 2^32-1": (_with("llama.vocab_size", g.U32, 2**32 - 1), "vocab_size"),
    "rms eps nan": (
        _with("llama.attention.layer_norm_rms_epsilon", g.F32, math.nan),
        "layer_norm_rms_epsilon",
    ),
    "freq_base as text": (_with("llama.rope.freq_base", g.STRING, "big"), "rope.freq_base"),
    "alignment inf": (_with("general.alignment", g.F32, math.inf), "general.alignment"),
    "alignment 0": (_with("general.alignment", g.U32, 0), "general.alignment"),
    "alignment 48": (_with("general.alignment", g.U32, 48), "general.alignment"),
    "alignment -32": (_with("general.alignment", g.I32, -32), "general.alignment"),
    "arrays 200,000 deep": (
        _with("general.tags", g.ARRAY, g.Raw(g.nested_array(200_000))),
        "nested deeper",
    ),
    "string longer than the file": (
        _with("general.name", g.STRING, g.Str("tiny", length=2**62)),
        "'general.name'",
    ),
    "array longer than the file": (
        _with("tokenizer.ggml.tokens", g.ARRAY, g.Arr(g.STRING, list(g.TOKENS), count=2**40)),
        "'tokenizer.ggml.tokens'",
    ),
    "u32 array longer than the file": (
        _with("tokenizer.ggml.token_type", g.ARRAY, g.Arr(g.I32, [1], count=2**61)),
        "'tokenizer.ggml.token_type'",
    ),
    "tokens not strings": (_with("tokenizer.ggml.tokens", g.U32, 5), "tokenizer"),
    "more tokens than embeddings": (_with("llama.vocab_size", g.U32, 4), "token_embd.weight"),
}


def test_the_catalog_lists_a_lying_header_with_its_problem(tmp_path: Path) -> None:
    h = _with("llama.block_count", g.U32, 2**31)
    info = describe(_write(tmp_path, g.to_bytes(h)))
    assert "llama.block_count" in info.error and "\n" not in info.error


@pytest.mark.parametrize("case", list(CASES))
def test_each_lying_value_is_one_line_naming_the_field(case: str, tmp_path: Path) -> None:
    header, field = CASES[case]
    result = load_bounded(_write(tmp_path, g.to_bytes(header)))
    assert result["error"] is not None and field in result["error"], result


def _raw_header_case(tmp_path: Path, edit) -> dict[str, Any]:
    h = g.tiny_llama()
    edit(h)
    return load_bounded(_write(tmp_path, g.to_bytes(h)))


def test_counts_and_tensor_entries_are_checked_against_the_file(tmp_path: Path) -> None:
    for edit, field in [
        (lambda h: setattr(h, "n_kv", 2**40), "metadata count"),
        (lambda h: setattr(h, "n_tensors", 2**40), "tensor count"),
        (lambda h: setattr(h.tensors[0], "dims", (32, 2**40)), "token_embd.weight"),
        (lambda h: setattr(h.tensors[0], "dims", (0, 8)), "token_embd.weight"),
        (lambda h: setattr(h.tensors[0], "offset", 2**63), "token_embd.weight"),
        (lambda h: setattr(h.tensors[1], "ggml_type", 2**31), "output_norm.weight"),
        (lambda h: setattr(h.tensors[1], "dims", (1,) * 9), "9 dimensions"),
        (lambda h: h.tensors.append(h.tensors[0]), "twice"),
        (lambda h: h.tensors.pop(), "missing tensors"),
        (lambda h: setattr(h.tensors[5], "dims", (32, 16)), "blk.0.attn_q.weight"),
    ]:
        result = _raw_header_case(tmp_path, edit)
        assert result["error"] is not None and field in result["error"], (field, result)


# -- the fuzzer ---------------------------------------------------------------------------

INTS = [0, 1, 2, 3, 31, 32, 33, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**40, 2**63 - 1]
FLOATS = [0.0, -1.0, 1e-30, 1.0, 1e30, math.inf, -math.inf, math.nan]
KEYS = [
    "general.alignment",
    "general.architecture",
    "llama.context_length",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.block_count",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.rope.dimension_count",
    "llama.rope.freq_base",
    "llama.rope.scaling.type",
    "llama.rope.scaling.factor",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.vocab_size",
    "llama.expert_count",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template",
]
_RANGES = {
    g.U8: (0, 2**8 - 1),
    g.I8: (-(2**7), 2**7 - 1),
    g.U16: (0, 2**16 - 1),
    g.I16: (-(2**15), 2**15 - 1),
    g.U32: (0, 2**32 - 1),
    g.I32: (-(2**31), 2**31 - 1),
    g.U64: (0, 2**64 - 1),
    g.I64: (-(2**63), 2**63 - 1),
}


def _scalar(vtype: int) -> st.SearchStrategy:
    if vtype in _RANGES:
        lo, hi = _RANGES[vtype]
        return st.one_of(
            st.sampled_from([v for v in INTS + [-1, lo, hi] if lo <= v <= hi]),
            st.integers(lo, hi),
        )
    if vtype in (g.F32, g.F64):
        return st.one_of(st.sampled_from(FLOATS), st.floats(width=32 if vtype == g.F32 else 64))
    if vtype == g.BOOL:
        return st.booleans()
    lengths = st.one_of(st.none(), st.sampled_from(INTS), st.integers(0, 2**64 - 1))
    return st.builds(g.Str, st.text(max_size=12), lengths)  # a string, maybe lying


@st.composite
def _value(draw) -> tuple[int, Any]:
    vtype = draw(st.integers(0, 14))  # 13, 14: unknown type ids
    if vtype == g.ARRAY:
        kind = draw(st.sampled_from(["array", "nested", "lying"]))
        if kind == "nested":
            return vtype, g.Raw(g.nested_array(draw(st.sampled_from([2, 3, 4, 50, 100_000]))))
        etype = draw(st.sampled_from([g.U8, g.I32, g.U32, g.F32, g.STRING, g.BOOL, 13]))
        items = draw(st.lists(_scalar(etype), max_size=12)) if etype != 13 else []
        count = draw(st.sampled_from(INTS)) if kind == "lying" else None
        return vtype, g.Arr(etype, items, count)
    return vtype, draw(_scalar(vtype)) if vtype < 13 else None


@st.composite
def _mutation(draw):
    kind = draw(st.sampled_from(["value", "value", "value", "counts", "tensor", "bytes"]))
    if kind == "value":
        return ("value", draw(st.sampled_from(KEYS)), *draw(_value()))
    if kind == "counts":
        return (
            kind,
            draw(st.sampled_from(["n_kv", "n_tensors", "version"])),
            draw(st.sampled_from(INTS)),
        )
    if kind == "tensor":
        field = draw(st.sampled_from(["dims", "ggml_type", "offset", "name"]))
        if field == "dims":
            value = tuple(draw(st.lists(st.sampled_from(INTS), max_size=9)))
        elif field == "name":
            value = draw(st.sampled_from(["blk.9.attn_q.weight", "x", "rope_freqs.weight", ""]))
        else:
            value = draw(st.sampled_from(INTS))
        return (kind, draw(st.integers(0, 11)), field, value)
    return (kind, draw(st.integers(0, 4096)), draw(st.integers(0, 255)))


def _apply(mutations: list[tuple]) -> bytes:
    h = g.tiny_llama()
    flips = []
    for m in mutations:
        if m[0] == "value":
            h.set(m[1], m[2], m[3])
        elif m[0] == "counts":
            setattr(h, m[1], m[2])
        elif m[0] == "tensor":
            setattr(h.tensors[m[1]], m[2], m[3])
        else:
            flips.append(m[1:])
    data = bytearray(g.to_bytes(h))
    for pos, byte in flips:
        data[pos % len(data)] = byte
    return bytes(data)


_DIR = Path(tempfile.mkdtemp(prefix="gguf-fuzz-"))


@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(_mutation(), min_size=1, max_size=3))
def test_fuzzed_headers_give_one_line_errors_within_bounds(mutations: list[tuple]) -> None:
    try:
        data = _apply(mutations)
    except (struct.error, OverflowError):
        return  # the writer cannot express this value in that type
    load_bounded(_write(_DIR, data))
