"""Sampling options and the pure functions that turn logits into the next token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from edge_infer.generation.constraint import Grammar, response_format_grammar, schema_grammar


@dataclass(frozen=True)
class SamplingParams:
    """Options shared by the Python API, the CLI and the server. ``temperature=0`` is greedy."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repetition_penalty: float = 1.0
    repetition_window: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    grammar: Grammar | None = None  # the output must match it (JSON schema, regex, Lark)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        checks = [
            (self.max_tokens >= 0, "max_tokens must be >= 0"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.repetition_window >= 0, "repetition_window must be >= 0"),
            (self.seed is None or 0 <= self.seed < 2**64, "seed must be in [0, 2**64)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {self})")

    @classmethod
    def from_kwargs(cls, params: SamplingParams | None = None, **kwargs: Any) -> SamplingParams:
        """``params`` (or the defaults) with the non-None keyword overrides applied.

        Besides the fields, ``json_schema=`` (a dict, JSON text or pydantic model) and
        ``response_format=`` (OpenAI's shape) set ``grammar``.
        """
        schema = kwargs.pop("json_schema", None)
        if schema is not None:
            kwargs["grammar"] = schema_grammar(schema)
        response_format = kwargs.pop("response_format", None)
        if response_format is not None:
            kwargs["grammar"] = response_format_grammar(response_format)
        known = {f.name for f in fields(cls)}
        unknown = set(kwargs) - known
        if unknown:
            raise TypeError(f"unknown sampling option(s): {', '.join(sorted(unknown))}")
        overrides = {k: v for k, v in kwargs.items() if v is not None}
        return replace(params or cls(), **overrides)


def apply_repetition_penalty(
    logits: np.ndarray, history: Sequence[int], penalty: float
) -> np.ndarray:
    """Make tokens already seen less likely: positive logits divided, negative multiplied."""
    if penalty == 1.0 or len(history) == 0:
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(history, dtype=np.int64))
    vals = out[seen]
    out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def filter_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the ``k`` largest logits (ties at the threshold kept); 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = np.partition(logits, -k)[-k]
    return np.where(logits >= threshold, logits, -np.inf)


def filter_top_p(logits: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose probability reaches ``p``."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, kind="stable")
    probs = softmax(logits[order])
    keep_sorted = np.cumsum(probs) - probs < p  # include the token that crosses p
    keep_sorted[0] = True
    out = np.full_like(logits, -np.inf)
    kept = order[keep_sorted]
    out[kept] = logits[kept]
    return out


def filter_min_p(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Drop tokens whose probability is below ``min_p`` times the most likely token's."""
    if min_p <= 0.0:
        return logits
    probs = softmax(logits)
    return np.where(probs >= min_p * probs.max(), logits, -np.inf)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-probabilities (float32) of a [..., vocab] array."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


class Sampler:
    """Picks tokens according to :class:`SamplingParams`; seeded, so runs can be repeated."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        if p.repetition_penalty != 1.0 and p.repetition_window:
            logits = apply_repetition_penalty(
                logits, history[-p.repetition_window :], p.repetition_penalty
            )
        if p.temperature == 0:
            return int(np.argmax(logits))
        logits = logits / p.temperature
        logits = filter_top_k(logits, p.top_k)
        logits = filter_top_p(logits, p.top_p)
        logits = filter_min_p(logits, p.min_p)
        cdf = np.cumsum(softmax(logits))
        return int(
            min(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"), len(cdf) - 1)
        )
