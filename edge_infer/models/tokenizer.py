"""Text <-> token ids for GGUF files and Hugging Face model directories.

The `tokenizers` library does the actual work; this module builds its pipeline from GGUF metadata
(byte-level BPE "gpt2" vocabularies and SentencePiece-style "llama" vocabularies) or loads a
``tokenizer.json``, and gathers what generation needs: BOS, the set of end-of-generation ids and
the chat template.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from edge_infer.models.chat_template import special_finder

logger = logging.getLogger(__name__)

__all__ = ["Tokenizer"]

# llama.cpp token types (gguf key tokenizer.ggml.token_type)
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4
TOKEN_UNUSED = 5
TOKEN_BYTE = 6

SUPPORTED_GGUF_MODELS = ("gpt2", "llama")

_SPM_SPACE = "\u2581"  # "▁"

# Texts of control tokens that end a turn or a document. A model that has one of these as a
# control token stops generating when it emits it, whatever its declared eos id is.
_END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|endoftext|>",
        "<|end_of_text|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<|im_end|>",
        "<|end|>",
        "<end_of_turn>",
        "<|end_of_turn|>",
        "<EOT>",
        "<|return|>",
        "<\uff5cend\u2581of\u2581sentence\uff5c>",  # DeepSeek, with fullwidth bars
    }
)

# --- pre-tokenizer regexes (split text into words before byte-level BPE), by llama.cpp name ---

_CONTRACTIONS = r"'s|'t|'re|'ve|'m|'ll|'d"
_GPT2 = _CONTRACTIONS + r"| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CASED_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CASED_CONTRACTIONS}"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CASED_CONTRACTIONS}"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# a space, then anything but whitespace and (CJK, Devanagari, Arabic) punctuation
_BLOOM = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

# Each entry: (regexes applied one after another, each splitting the pieces of the previous
# one; whether whole words found in the vocabulary skip the merges).
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {}


def _register(names: Iterable[str], regexes: tuple[str, ...], ignore_merges: bool = False) -> None:
    for name in names:
        _PRE_TOKENIZERS[name] = (regexes, ignore_merges)


_register(
    ["default", "gpt2", "gpt-2", "mpt", "olmo", "jais", "phi-2", "trillion", "roberta-bpe"],
    (_GPT2,),
)
_register(
    ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
    (_LLAMA3,),
    ignore_merges=True,
)
_register(["dbrx", "smaug-bpe", "chatglm-bpe"], (_LLAMA3,))
_register(["qwen2", "deepseek-r1-qwen", "megrez", "stablelm2", "hunyuan"], (_QWEN2,))
_register(
    ["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"],
    (r"\p{N}", _GPT2),
)
_register(["falcon"], (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))
_register(["tekken"], (_TEKKEN,), ignore_merges=True)
_register(["gpt-4o", "llama4"], (_GPT4O,))
_register(["poro-chat", "bloom", "gpt3-finnish"], (_BLOOM,))
_register(["viking"], (_BLOOM, r"\p{N}"))

# llama.cpp turns BOS on by default for these pre-tokenizers (their models expect it).
_ADD_BOS_PRE = frozenset(
    {
        "llama3",
        "llama-v3",
        "llama-bpe",
        "falcon3",
        "falcon-h1",
        "pixtral",
        "midm-2.0",
        "lfm2",
        "tekken",
    }
)


@cache
def _byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: a printable character standing for each byte value."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@cache
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in _byte_to_unicode().items()}


def _byte_level_to_bytes(text: str) -> bytes:
    table = _unicode_to_byte()
    if all(c in table for c in text):
        return bytes(table[c] for c in text)
    return text.encode("utf-8")  # not byte-level spelled (e.g. a raw added token)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if hasattr(value, "tolist"):  # numpy arrays
        return list(value.tolist())
    return list(value)


def _as_str(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _opt_int(meta: Mapping[str, Any], key: str, n_vocab: int) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    value = int(value)
    if not 0 <= value < n_vocab:
        logger.warning("%s = %d is outside the vocabulary (%d tokens)", key, value, n_vocab)
        return None
    return value


class Tokenizer:
    """Encodes text to token ids and decodes ids to text.

    Build it with :meth:`from_gguf_metadata` or :meth:`from_hf_dir`. :meth:`encode` encodes
    special-token strings in its text (e.g. ``"<|im_start|>"``) as their single ids;
    :meth:`encode_parts` does so only for the pieces marked as markup (a chat template's
    own), and encodes special-token text anywhere else as plain text.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        kind: str,
        bos_id: int | None,
        eos_ids: Iterable[int],
        eos_id: int | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        vocab_size: int | None = None,
        aliases: Mapping[int, int] | None = None,
        added_raw_ids: Iterable[int] = (),
    ) -> None:
        """Wrap a ready `tokenizers.Tokenizer`; `kind` is "byte_level", "spm" or "other"."""
        self._backend = backend
        self._kind = kind
        self._aliases = dict(aliases or {})
        self._added_raw_ids = frozenset(added_raw_ids)
        self._token_bytes: list[bytes] | None = None
        self.vocab_size: int = (
            vocab_size if vocab_size is not None else backend.get_vocab_size(with_added_tokens=True)
        )
        self.bos_id: int | None = bos_id
        self.eos_id: int | None = eos_id
        eos = set(eos_ids)
        if eos_id is not None:
            eos.add(eos_id)
        self.eos_ids: frozenset[int] = frozenset(eos)
        self.bos_token: str | None = self.id_to_token(bos_id) if bos_id is not None else None
        self.eos_token: str | None = self.id_to_token(eos_id) if eos_id is not None else None
        self.chat_template: str | None = chat_template
        self.add_bos: bool = bool(add_bos) and bos_id is not None
        added = backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(
            tok_id for tok_id, tok in added.items() if tok.special
        )
        # special-token text -> (id, lstrip, rstrip): how the library splits text on it
        self._specials: dict[str, tuple[int, bool, bool]] = {}
        for tok_id, tok in sorted(added.items()):
            if tok.special and tok.content and tok.content not in self._specials:
                self._specials[tok.content] = (tok_id, tok.lstrip, tok.rstrip)
        self.special_texts: tuple[str, ...] = tuple(self._specials)
        self._plain: tokenizers.Tokenizer | None = None  # built on first use
        self._plain_lock = threading.Lock()

    @cached_property
    def special_pattern(self) -> re.Pattern[str]:
        """A pattern matching any special-token text (one per tokenizer: compiling it for
        thousands of special tokens takes a noticeable part of a second)."""
        return special_finder(self.special_texts)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self._kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_ids={sorted(self.eos_ids)}, add_bos={self.add_bos})"
        )

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; prepend BOS when `add_bos` (None: the model's default).

        BOS is not doubled when the text itself already starts with the BOS token string.
        """
        # encode_batch releases the GIL (encode holds it throughout): tokenizing a long text
        # on a worker thread does not stall the others, such as the server's event loop
        ids = self._backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def encode_parts(
        self, parts: Sequence[tuple[str, bool]], add_bos: bool | None = None
    ) -> list[int]:
        """Token ids of a prompt given as pieces ``(text, is_markup)`` (see
        :func:`~edge_infer.models.chat_template.render_chat_parts`): a markup piece is one
        special token's text and gives its id; special-token text inside any other piece is
        encoded as plain text. BOS as in :meth:`encode`.

        For pieces with no special-token text this gives exactly what :meth:`encode` gives for
        the joined text: the library also splits on special tokens before anything else.
        """
        texts = [text for text, _ in parts]
        for i, (text, markup) in enumerate(parts):
            if not markup:
                continue
            if text not in self._specials:
                raise ValueError(f"{text!r} is not a special token of this tokenizer")
            _, lstrip, rstrip = self._specials[text]
            if lstrip and i > 0 and not parts[i - 1][1]:
                texts[i - 1] = texts[i - 1].rstrip()
            if rstrip and i + 1 < len(parts) and not parts[i + 1][1]:
                texts[i + 1] = texts[i + 1].lstrip()
        ids: list[int] = []
        for text, (_, markup) in zip(texts, parts, strict=True):
            if markup:
                ids.append(self._specials[text][0])
            elif text:
                ids += self._encode_plain(text)
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Ids of ``text`` with special-token strings in it encoded as ordinary text."""
        # one pass of one pattern: a substring search per special token crawls through a
        # long message when there are thousands of them (Gemma has over 6,000)
        if self.special_pattern.search(text) is None:
            return self._backend.encode(text, add_special_tokens=False).ids
        with self._plain_lock:
            if self._plain is None:
                # a copy whose special tokens never match: flipping the flag on the shared
                # backend would race with encodes on other threads
                plain = tokenizers.Tokenizer.from_str(self._backend.to_str())
                plain.encode_special_tokens = True
                self._plain = plain
            plain = self._plain
        return plain.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`; with `skip_special`, control tokens (BOS, EOS, ...) are left out."""
        id_list = [int(i) for i in ids]
        if self._aliases:
            id_list = [self._aliases.get(i, i) for i in id_list]
        return self._backend.decode(id_list, skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (byte-fallback tokens give a single byte).

        A SentencePiece token's leading "▁" is given as a space. Special tokens give their text.
        """
        if self._token_bytes is None:
            self._token_bytes = self._build_token_bytes()
        token_id = self._aliases.get(token_id, token_id)
        if 0 <= token_id < len(self._token_bytes):
            return self._token_bytes[token_id]
        return b""

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary string of a token id (as stored, e.g. "Ġhello" or "▁hello")."""
        token_id = self._aliases.get(token_id, token_id)
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary string, or None."""
        return self._backend.token_to_id(token)

    def _build_token_bytes(self) -> list[bytes]:
        size = max(self.vocab_size, self._backend.get_vocab_size(with_added_tokens=True))
        out: list[bytes] = []
        for tok_id in range(size):
            tok = self._backend.id_to_token(tok_id)
            if tok is None:
                out.append(b"")
            elif tok_id in self._added_raw_ids:
                out.append(tok.encode("utf-8"))
            elif self._kind == "byte_level":
                out.append(_byte_level_to_bytes(tok))
            elif self._kind == "spm":
                if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                    try:
                        out.append(bytes([int(tok[3:5], 16)]))
                        continue
                    except ValueError:
                        pass
                out.append(tok.replace(_SPM_SPACE, " ").encode("utf-8"))
            else:
                out.append(self._backend.decode([tok_id], skip_special_tokens=False).encode())
        return out

    # ------------------------------------------------------------------ GGUF

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF key/value metadata (a mapping of key to plain Python value)."""
        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise ValueError("GGUF metadata has no tokenizer.ggml.model key")
        model = _as_str(model)
        if model not in SUPPORTED_GGUF_MODELS:
            raise ValueError(
                f"unsupported GGUF tokenizer model {model!r} (tokenizer.ggml.model); "
                f"supported: {', '.join(SUPPORTED_GGUF_MODELS)}"
            )
        if "tokenizer.ggml.tokens" not in meta:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens key (no vocabulary)")
        tokens = [_as_str(t) for t in _as_list(meta["tokenizer.ggml.tokens"])]
        if not tokens:
            raise ValueError("GGUF tokenizer.ggml.tokens is empty")
        n_vocab = len(tokens)
        types = [int(t) for t in _as_list(meta.get("tokenizer.ggml.token_type"))]
        if len(types) != n_vocab:
            if types:
                logger.warning(
                    "tokenizer.ggml.token_type has %d entries for %d tokens; ignored",
                    len(types),
                    n_vocab,
                )
            types = [TOKEN_NORMAL] * n_vocab
            if model == "llama":
                for i, tok in enumerate(tokens):
                    if len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
                        types[i] = TOKEN_BYTE
                defaults = {"bos": 1, "eos": 2, "unknown": 0}
            else:
                defaults = {}
            # without types, the declared special ids are the control tokens
            for name in ("bos", "eos", "unknown", "padding", "eot", "eom"):
                key = f"tokenizer.ggml.{name}_token_id"
                tok_id = _opt_int(meta, key, n_vocab) if key in meta else defaults.get(name)
                if tok_id is not None and tok_id < n_vocab:
                    types[tok_id] = TOKEN_UNKNOWN if name == "unknown" else TOKEN_CONTROL

        # string -> id; for duplicate strings the first id wins and later ones decode as it
        vocab: dict[str, int] = {}
        aliases: dict[int, int] = {}
        for i, tok in enumerate(tokens):
            if tok in vocab:
                aliases[i] = vocab[tok]
            else:
                vocab[tok] = i
        if aliases:
            logger.warning("GGUF vocabulary has %d duplicate token strings", len(aliases))

        if model == "gpt2":
            pre = _as_str(meta.get("tokenizer.ggml.pre", "default"))
            backend = _build_byte_level_bpe(meta, vocab, pre)
            kind = "byte_level"
            default_add_bos = pre in _ADD_BOS_PRE
            bos_default: int | None = None
            eos_default: int | None = None
        else:
            add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
            backend = _build_spm_bpe(meta, tokens, types, vocab, add_space_prefix)
            kind = "spm"
            default_add_bos = True
            bos_default, eos_default = 1, 2

        # control/unknown tokens are special (skippable on decode); user-defined ones are not
        special: list[AddedToken] = []
        user: list[AddedToken] = []
        raw_ids: list[int] = []
        for i, (tok, typ) in enumerate(zip(tokens, types, strict=True)):
            if not tok or i in aliases:
                continue
            if typ in (TOKEN_CONTROL, TOKEN_UNKNOWN):
                special.append(AddedToken(tok, special=True, normalized=False))
                raw_ids.append(i)
            elif typ == TOKEN_USER_DEFINED:
                user.append(AddedToken(tok, special=False, normalized=False))
                raw_ids.append(i)
        if special:
            backend.add_special_tokens(special)
        if user:
            backend.add_tokens(user)

        bos_id = _opt_int(meta, "tokenizer.ggml.bos_token_id", n_vocab)
        if bos_id is None and "tokenizer.ggml.bos_token_id" not in meta:
            bos_id = bos_default if bos_default is not None and bos_default < n_vocab else None
        eos_id = _opt_int(meta, "tokenizer.ggml.eos_token_id", n_vocab)
        if eos_id is None and "tokenizer.ggml.eos_token_id" not in meta:
            eos_id = eos_default if eos_default is not None and eos_default < n_vocab else None
        eos_ids = {
            i
            for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
            if (i := _opt_int(meta, key, n_vocab)) is not None
        }
        eos_ids |= {
            i
            for i, (tok, typ) in enumerate(zip(tokens, types, strict=True))
            if typ == TOKEN_CONTROL and tok in _END_OF_GENERATION_TEXTS
        }
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos))
        template = meta.get("tokenizer.chat_template")
        return cls(
            backend,
            kind=kind,
            bos_id=bos_id,
            eos_id=eos_id,
            eos_ids=eos_ids,
            add_bos=add_bos,
            chat_template=_as_str(template) if template is not None else None,
            vocab_size=n_vocab,
            aliases=aliases,
            added_raw_ids=raw_ids,
        )

    # ------------------------------------------------------------------ Hugging Face

    @classmethod
    def from_hf_dir(cls, path: Path) -> Tokenizer:
        """Load ``tokenizer.json`` plus the config files beside it from a model directory."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"{tok_file} not found (only tokenizer.json tokenizers are supported)")
        backend = tokenizers.Tokenizer.from_file(str(tok_file))
        tok_cfg = _read_json(path / "tokenizer_config.json")
        st_map = _read_json(path / "special_tokens_map.json")
        gen_cfg = _read_json(path / "generation_config.json")
        model_cfg = _read_json(path / "config.json")
        text_cfg = model_cfg.get("text_config")
        if not isinstance(text_cfg, dict):
            text_cfg = {}

        def token_id(name: str) -> int | None:
            for source in (tok_cfg, st_map):
                text = _token_content(source.get(name))
                if text is not None:
                    found = backend.token_to_id(text)
                    if found is not None:
                        return found
            return None

        def config_ids(name: str) -> list[int]:
            for source in (gen_cfg, model_cfg, text_cfg):
                value = source.get(name)
                if value is not None:
                    return [int(v) for v in (value if isinstance(value, list) else [value])]
            return []

        bos_id = token_id("bos_token")
        if bos_id is None:
            bos_ids = config_ids("bos_token_id")
            bos_id = bos_ids[0] if bos_ids else None
        eos_id = token_id("eos_token")
        cfg_eos = config_ids("eos_token_id")
        if eos_id is None and cfg_eos:
            eos_id = cfg_eos[0]
        eos_ids = set(cfg_eos)
        for tok_id, tok in backend.get_added_tokens_decoder().items():
            if tok.special and tok.content in _END_OF_GENERATION_TEXTS:
                eos_ids.add(tok_id)

        add_bos_cfg = tok_cfg.get("add_bos_token")
        if isinstance(add_bos_cfg, bool):
            add_bos = add_bos_cfg
        else:  # does the tokenizer's own post-processor put BOS in front?
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and bool(probe) and probe[0] == bos_id
            if add_bos and backend.encode("a", add_special_tokens=False).ids[:1] == [bos_id]:
                add_bos = False

        return cls(
            backend,
            kind=_hf_kind(backend),
            bos_id=bos_id,
            eos_id=eos_id,
            eos_ids=eos_ids,
            add_bos=add_bos,
            chat_template=_hf_chat_template(path, tok_cfg),
        )


# ---------------------------------------------------------------------- builders


def _build_byte_level_bpe(
    meta: Mapping[str, Any], vocab: dict[str, int], pre: str
) -> tokenizers.Tokenizer:
    if pre in _PRE_TOKENIZERS:
        regexes, ignore_merges = _PRE_TOKENIZERS[pre]
    else:
        logger.warning(
            "unknown GGUF pre-tokenizer %r (tokenizer.ggml.pre); falling back to gpt2 splitting, "
            "tokenization may differ from the original model",
            pre,
        )
        regexes, ignore_merges = _PRE_TOKENIZERS["gpt2"]
    merges: list[tuple[str, str]] = []
    for merge in _as_list(meta.get("tokenizer.ggml.merges")):
        if isinstance(merge, list | tuple):
            left, right = (_as_str(m) for m in merge)
        else:
            left, sep, right = _as_str(merge).partition(" ")
            if not sep:
                continue
        if left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    if not merges:
        logger.warning("GGUF byte-level vocabulary has no merges; tokenization will be poor")
    bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _build_spm_bpe(
    meta: Mapping[str, Any],
    tokens: list[str],
    types: list[int],
    vocab: dict[str, int],
    add_space_prefix: bool,
) -> tokenizers.Tokenizer:
    scores_raw = _as_list(meta.get("tokenizer.ggml.scores"))
    if len(scores_raw) == len(tokens):
        scores = [float(s) for s in scores_raw]
    else:
        if scores_raw:
            logger.warning("tokenizer.ggml.scores has the wrong length; using token order")
        scores = [-float(i) for i in range(len(tokens))]

    mergeable = {
        tok: i for tok, i in vocab.items() if types[i] in (TOKEN_NORMAL, TOKEN_USER_DEFINED)
    }
    file_merges = _as_list(meta.get("tokenizer.ggml.merges"))
    merges: list[tuple[str, str]] = []
    if file_merges:
        for merge in file_merges:
            left, sep, right = _as_str(merge).partition(" ")
            if sep and left in vocab and right in vocab and left + right in vocab:
                merges.append((left, right))
    else:
        # A merge (a, b) exists when a, b and a+b are tokens; higher score of a+b merges first.
        ranked: list[tuple[float, int, int, str, str]] = []
        for tok, i in mergeable.items():
            for cut in range(1, len(tok)):
                left, right = tok[:cut], tok[cut:]
                if left in mergeable and right in mergeable:
                    ranked.append((-scores[i], i, cut, left, right))
        ranked.sort()
        merges = [(left, right) for *_, left, right in ranked]

    unk_id = _opt_int(meta, "tokenizer.ggml.unknown_token_id", len(tokens))
    if unk_id is None and "tokenizer.ggml.unknown_token_id" not in meta:
        unk_id = next((i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
    unk_token = tokens[unk_id] if unk_id is not None else None
    bpe = models.BPE(
        vocab=vocab, merges=merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True
    )
    backend = tokenizers.Tokenizer(bpe)
    replace = normalizers.Replace(" ", _SPM_SPACE)
    if add_space_prefix:
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), replace])
    else:
        backend.normalizer = replace
    steps = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


# ---------------------------------------------------------------------- HF helpers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("cannot read %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in value if isinstance(d, dict)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None


def _hf_chat_template(path: Path, tok_cfg: Mapping[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    from_json = _pick_template(_read_json(path / "chat_template.json").get("chat_template"))
    if from_json is not None:
        return from_json
    return _pick_template(tok_cfg.get("chat_template"))


def _hf_kind(backend: tokenizers.Tokenizer) -> str:
    if backend.decoder is None:
        return "other"
    decoder = json.loads(backend.decoder.__getstate__())
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    names = {p.get("type") for p in parts if isinstance(p, dict)}
    if "ByteLevel" in names:
        return "byte_level"
    if "ByteFallback" in names or "Metaspace" in names:
        return "spm"
    return "other"
