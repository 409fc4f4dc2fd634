"""A minimal GGUF writer for header tests: explicit value types, and lengths that may lie.

``Header`` describes a file as entries; ``to_bytes`` lays it out as the format does. A
``Str`` or ``Arr`` with ``length``/``count`` set writes that number instead of the true one,
and ``n_kv``/``n_tensors`` override the header counts, so tests can write what a corrupt or
hostile file says. ``tiny_llama`` is a complete, loadable one-layer model (F32 weights).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_FORMATS = {
    U8: "<B",
    I8: "<b",
    U16: "<H",
    I16: "<h",
    U32: "<I",
    I32: "<i",
    F32: "<f",
    BOOL: "<?",
    U64: "<Q",
    I64: "<q",
    F64: "<d",
}
GGML_F32 = 0


@dataclass
class Str:
    text: str | bytes
    length: int | None = None  # written instead of the true byte length


@dataclass
class Arr:
    etype: int
    items: list[Any]
    count: int | None = None  # written instead of the true count


@dataclass
class Raw:
    data: bytes  # a value's bytes exactly as given


@dataclass
class Tensor:
    name: str
    dims: tuple[int, ...]  # GGUF order (row length first)
    ggml_type: int = GGML_F32
    offset: int | None = None  # None: laid out after the previous tensor; else no data
    data: bytes = b""


@dataclass
class Header:
    kvs: list[tuple[str, int, Any]] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    version: int = 3
    n_kv: int | None = None
    n_tensors: int | None = None
    alignment: int = 32  # how the writer pads; general.alignment is a key like any other

    def set(self, key: str, vtype: int, value: Any) -> None:
        self.kvs = [kv for kv in self.kvs if kv[0] != key] + [(key, vtype, value)]


def _string(s: Str | str | bytes) -> bytes:
    s = s if isinstance(s, Str) else Str(s)
    raw = s.text.encode("utf-8", "surrogatepass") if isinstance(s.text, str) else s.text
    return struct.pack("<Q", len(raw) if s.length is None else s.length) + raw


def value_bytes(vtype: int, value: Any) -> bytes:
    if isinstance(value, Raw):
        return value.data
    if vtype in SCALAR_FORMATS:
        return struct.pack(SCALAR_FORMATS[vtype], value)
    if vtype == STRING:
        return _string(value)
    if vtype == ARRAY:
        arr = value if isinstance(value, Arr) else Arr(U32, list(value))
        n = len(arr.items) if arr.count is None else arr.count
        body = b"".join(value_bytes(arr.etype, item) for item in arr.items)
        return struct.pack("<IQ", arr.etype, n) + body
    return b""  # an unknown type id: the type is written, no value


def to_bytes(h: Header) -> bytes:
    out = bytearray(b"GGUF")
    n_kv = len(h.kvs) if h.n_kv is None else h.n_kv
    n_t = len(h.tensors) if h.n_tensors is None else h.n_tensors
    out += struct.pack("<IQQ", h.version, n_t, n_kv)
    for key, vtype, value in h.kvs:
        out += _string(key) + struct.pack("<I", vtype) + value_bytes(vtype, value)
    pos = 0
    offsets = []
    for t in h.tensors:
        offset = pos if t.offset is None else t.offset
        offsets.append(offset)
        if t.offset is None:
            pos = -(-(offset + len(t.data)) // h.alignment) * h.alignment
        out += _string(t.name) + struct.pack("<I", len(t.dims))
        out += b"".join(struct.pack("<Q", d) for d in t.dims)
        out += struct.pack("<IQ", t.ggml_type, offset)
    out += b"\0" * (-len(out) % h.alignment)
    base = len(out)
    for t, offset in zip(h.tensors, offsets, strict=True):
        if t.offset is not None:
            continue  # an offset given by the test: the entry may point anywhere, no data
        if base + offset + len(t.data) > len(out):
            out += b"\0" * (base + offset + len(t.data) - len(out))
        out[base + offset : base + offset + len(t.data)] = t.data
    return bytes(out)


TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "a", "b", "Ġ", "Ċ", "ab"]


def tiny_llama(seed: int = 0) -> Header:
    """A complete one-layer llama: hidden 32, 2 heads of 16 (1 KV head), F32 weights."""
    rng = np.random.default_rng(seed)
    hidden, ffn, heads, kv, head_dim, vocab = 32, 64, 2, 1, 16, len(TOKENS)
    h = Header()
    for key, vtype, value in [
        ("general.architecture", STRING, "llama"),
        ("general.name", STRING, "tiny"),
        ("llama.context_length", U32, 128),
        ("llama.embedding_length", U32, hidden),
        ("llama.feed_forward_length", U32, ffn),
        ("llama.block_count", U32, 1),
        ("llama.attention.head_count", U32, heads),
        ("llama.attention.head_count_kv", U32, kv),
        ("llama.rope.freq_base", F32, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.vocab_size", U32, vocab),
        ("tokenizer.ggml.model", STRING, "gpt2"),
        ("tokenizer.ggml.pre", STRING, "smollm"),
        ("tokenizer.ggml.tokens", ARRAY, Arr(STRING, list(TOKENS))),
        ("tokenizer.ggml.token_type", ARRAY, Arr(I32, [3, 3, 3, 1, 1, 1, 1, 1])),
        ("tokenizer.ggml.merges", ARRAY, Arr(STRING, ["a b"])),
        ("tokenizer.ggml.bos_token_id", U32, 1),
        ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.chat_template", STRING, "{{ messages[0]['content'] }}"),
    ]:
        h.set(key, vtype, value)

    def f32(name: str, *shape: int) -> None:
        data = rng.standard_normal(shape).astype("<f4").tobytes()
        h.tensors.append(Tensor(name, tuple(reversed(shape)), GGML_F32, None, data))

    f32("token_embd.weight", vocab, hidden)
    f32("output_norm.weight", hidden)
    f32("output.weight", vocab, hidden)
    f32("blk.0.attn_norm.weight", hidden)
    f32("blk.0.ffn_norm.weight", hidden)
    f32("blk.0.attn_q.weight", heads * head_dim, hidden)
    f32("blk.0.attn_k.weight", kv * head_dim, hidden)
    f32("blk.0.attn_v.weight", kv * head_dim, hidden)
    f32("blk.0.attn_output.weight", hidden, heads * head_dim)
    f32("blk.0.ffn_gate.weight", ffn, hidden)
    f32("blk.0.ffn_up.weight", ffn, hidden)
    f32("blk.0.ffn_down.weight", hidden, ffn)
    return h


def nested_array(depth: int) -> bytes:
    """The bytes of an ARRAY value holding one array, holding one array... ``depth`` deep."""
    return struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQ", U8, 0)
