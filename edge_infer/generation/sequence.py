"""One sequence being generated, as a step-by-step state machine, and what it cost.

A caller drives one :class:`Generation` alone; the batch decoder drives several at once,
feeding each the logits of its row of a batched forward pass. Either way a sequence samples
the same tokens: the state here is all that sampling depends on.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from edge_infer.backends.base import KVCache
from edge_infer.generation.constraint import TokenConstraint
from edge_infer.generation.detokenize import IncrementalDetokenizer, StopMatcher
from edge_infer.generation.runner import Runner
from edge_infer.generation.sampling import Sampler, SamplingParams, log_softmax

# What a step hands back: (token id, new text); token None carries held-back text at the end.
Piece = tuple[int | None, str]


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely alternatives
    (``top``: (token, log-probability), most likely first)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprob(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """``token``'s log-probability under the raw ``logits`` (before any sampling option), and
    the ``top`` most likely tokens (ties: the lower id first, as greedy picks)."""
    lp = log_softmax(np.asarray(logits, dtype=np.float32).reshape(-1))
    best: list[tuple[int, float]] = []
    if top > 0:
        k = min(top, lp.shape[0])
        cand = np.argpartition(-lp, k - 1)[:k]
        cand = cand[np.lexsort((cand, -lp[cand]))]
        best = [(int(t), float(lp[t])) for t in cand]
    return TokenLogprob(int(token), float(lp[token]), best)


@dataclass
class Usage:
    """What one generation cost: token counts, time to first token and speeds."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    finish_reason: str = ""
    image_tokens: int = 0  # image tokens the language model saw (kept by dropping)
    image_tokens_total: int = 0  # image tokens without dropping


class Generation:
    """Prefill, then sample/feed steps, for one prompt on one cache."""

    def __init__(
        self,
        runner: Runner,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        cache: KVCache,
        usage: Usage,
    ) -> None:
        self.runner, self.params, self.cache, self.usage = runner, params, cache, usage
        self.prompt_ids = list(prompt_ids)
        runner.check_fits(len(self.prompt_ids))
        self.held = cache.length
        if self.held >= len(self.prompt_ids):
            raise ValueError("the cache must leave at least one prompt token to prefill")
        usage.prompt_tokens, usage.cached_tokens = len(self.prompt_ids), self.held
        self.generated: list[int] = []
        self.finished = False
        self.next_input: int | None = None  # the token whose forward pass comes next
        self._logits: np.ndarray | None = None
        self._sampler = Sampler(params)
        self._constraint = (
            TokenConstraint(params.grammar, runner.tokenizer, runner.vocab_size)
            if params.grammar is not None
            else None
        )
        self._history = list(self.prompt_ids)
        self._detok = IncrementalDetokenizer(runner.tokenizer)
        self._stops = StopMatcher(params.stop)
        self._read_upto = self.held
        self._t0 = time.perf_counter()
        self._t_first = 0.0
        self.logprobs: list[TokenLogprob] | None = None  # one per generated token, if kept
        self._top_logprobs = 0

    def keep_logprobs(self, top: int = 0) -> None:
        """Record each generated token's log-probability, with the ``top`` most likely
        alternatives, in ``logprobs`` (call before the first sample)."""
        self.logprobs, self._top_logprobs = [], top

    # -- prefill ----------------------------------------------------------------------------
    @property
    def prefilling(self) -> bool:
        return self._logits is None and not self.finished

    def prefill(self, max_tokens: int | None = None) -> bool:
        """Prefill up to ``max_tokens`` more prompt tokens (all by default); True when done."""
        if not self.prefilling:
            return True
        ids = self.prompt_ids
        end = len(ids) if max_tokens is None else min(len(ids), self._read_upto + max_tokens)
        if end > self._read_upto:
            last = self.runner.prefill(ids[self._read_upto : end], self.cache)  # in chunks
            self._read_upto = end
        if self._read_upto < len(ids):
            return False
        self._logits = last
        self._t_first = time.perf_counter()
        self.usage.ttft_s = self._t_first - self._t0
        self.usage.prefill_tokens_per_s = (len(ids) - self.held) / max(self.usage.ttft_s, 1e-9)
        return True

    # -- decode -----------------------------------------------------------------------------
    def sample(self) -> list[Piece]:
        """Sample the next token from the current logits; what it adds to the reply.

        Afterwards either ``finished`` is set or ``next_input`` must be fed through the
        model and its logits passed to :meth:`feed`.
        """
        if self._logits is None or self.finished:
            raise RuntimeError("sample() needs fresh logits (prefill or feed first)")
        p, usage = self.params, self.usage
        logits, self._logits, self.next_input = self._logits, None, None
        if usage.completion_tokens >= p.max_tokens:
            return self._finish("length")
        constraint = self._constraint
        if constraint is not None:
            if constraint.done:
                return self._finish("stop")
            logits = constraint.apply(logits)  # EOS stays allowed once the output is complete
        token = self._sampler(logits, self._history)
        if token in self.runner.tokenizer.eos_ids and not p.ignore_eos:
            return self._finish("stop")
        if constraint is not None:
            constraint.accept(token)
        if self.logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self._top_logprobs))
        self._history.append(token)
        self.generated.append(token)
        usage.completion_tokens += 1
        text, stopped = self._stops.feed(self._detok.add(token))
        pieces: list[Piece] = [(token, text)]
        if stopped:
            return pieces + self._finish("stop", stopped=True)
        if constraint is not None and constraint.done:
            return pieces + self._finish("stop")
        room = self.cache.length + 1 < self.runner.context_length
        if usage.completion_tokens >= p.max_tokens or not room:
            return pieces + self._finish("length")
        self.next_input = token
        return pieces

    def feed(self, logits: np.ndarray) -> None:
        """The logits after ``next_input`` went through the model."""
        self._logits = logits

    def run(self) -> Iterator[Piece]:
        """Prefill, then decode this sequence alone to the end, yielding pieces."""
        self.prefill()
        while True:
            yield from self.sample()
            if self.finished:
                return
            self.feed(self.runner.step(self.next_input, self.cache))

    def cancel(self) -> None:
        """Stop early (the caller gave up): usage records ``finish_reason="cancelled"``."""
        if not self.finished:
            self._finish("cancelled", stopped=True)

    def _finish(self, reason: str, stopped: bool = False) -> list[Piece]:
        self.finished = True
        self.next_input = None
        pieces: list[Piece] = []
        if not stopped:
            text, stopped = self._stops.feed(self._detok.flush())
            if not stopped:
                text += self._stops.flush()
            else:
                reason = "stop"
            if text:
                pieces.append((None, text))
        usage = self.usage
        elapsed = time.perf_counter() - self._t_first
        if self._t_first and usage.completion_tokens > 1 and elapsed > 0:
            usage.decode_tokens_per_s = (usage.completion_tokens - 1) / elapsed
        usage.finish_reason = reason
        return pieces
