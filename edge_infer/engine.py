"""The engine: ties a model, a backend and the generation loop together."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_infer.agent_manager import AgentManager
from edge_infer.agent_turn import AgentTurn
from edge_infer.agents import Agent, AgentInfo, as_messages
from edge_infer.backends.base import Backend, create_backend
from edge_infer.config import default_backend
from edge_infer.errors import ContextLengthError
from edge_infer.generation import Generation
from edge_infer.models.chat_template import compile_template, render_chat
from edge_infer.models.loader import load_model
from edge_infer.models.spec import LoadedModel
from edge_infer.sampling import SamplingParams, log_softmax

DEFAULT_PREFILL_CHUNK = 512


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


class Engine:
    """A loaded model on a backend. Create with :meth:`Engine.load`."""

    def __init__(
        self, model: LoadedModel, backend: Backend, prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.model = model
        self.backend = backend
        self.tokenizer = model.tokenizer
        self.prefill_chunk = prefill_chunk
        self.last_usage = Usage()
        self._agent_manager: AgentManager | None = None
        self._agent_manager_lock = threading.Lock()
        try:  # ready for the first chat; an invalid template is reported when a chat uses it
            compile_template(self.tokenizer.chat_template)
        except ValueError:
            pass

    @classmethod
    def load(
        cls,
        model: str | Path | None = None,
        backend: str | None = None,
        *,
        device: str | None = None,
        kv_bits: int = 4,
        kv_group_size: int = 64,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        progress: Callable[[int, int], None] | None = None,
    ) -> Engine:
        """Load ``model`` (a .gguf file or a Hugging Face/MLX directory; None = the embedded
        default) on ``backend`` ("auto", "torch" or "mlx"). KV caches hold keys and values in
        ``kv_bits`` (4 = default, 8, or 16 = float16)."""
        loaded = load_model(model, progress=progress)
        be = create_backend(
            loaded,
            backend or default_backend(),
            device=device,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
        )
        return cls(loaded, be, prefill_chunk=prefill_chunk)

    # -- agents ---------------------------------------------------------------------------------
    @property
    def _agents(self) -> AgentManager:
        with self._agent_manager_lock:
            if self._agent_manager is None:
                self._agent_manager = AgentManager(
                    self,
                    getattr(self.backend, "kv_bits", 4),
                    getattr(self.backend, "kv_group_size", 64),
                )
            return self._agent_manager

    def agent(self, name: str, system: str | None = None, overflow: str | None = None) -> Agent:
        """Agent ``name``: created, or restored from its cache on disk. ``system`` sets its
        system prompt; ``overflow="drop_oldest"`` drops the oldest turns instead of failing
        when the conversation outgrows the context."""
        return self._agents.agent(name, system=system, overflow=overflow)

    def chat_many(
        self,
        requests: Mapping[str, str | list[dict[str, Any]]],
        params: SamplingParams | None = None,
        **kwargs: Any,
    ) -> dict[str, str]:
        """Each named agent answers its message (a string, or a list of messages), all at
        once: the agents decode together, one batched forward pass per token.

        Replies and caches are the same as from one ``agent(name).chat(...)`` after another.
        """
        from edge_infer.batching import decode_together

        mgr = self._agents
        turns: list[AgentTurn] = []
        try:
            for name, content in requests.items():
                turns.append(mgr.begin_turn(name, as_messages(content), params, kwargs))
            for i, pieces in decode_together(self.backend, [t.generation for t in turns]):
                turns[i].record(pieces)
        finally:
            for t in turns:
                t.finish()
        return {t.name: t.text for t in turns}

    def agents(self) -> list[AgentInfo]:
        """Agents in memory or on disk: tokens held, bytes in memory and on disk, last use."""
        return self._agents.list()

    def has_agent(self, name: str) -> bool:
        """Whether agent ``name`` exists (in memory or with a cache on disk)."""
        return self._agents.exists(name)

    def delete_agent(self, name: str) -> bool:
        """Delete agent ``name`` from memory and disk; True if it existed."""
        return self._agents.delete(name)

    def flush(self, name: str | None = None) -> None:
        """Wait until agents' caches (``name``'s, or all) are written to disk."""
        if self._agent_manager is not None:
            self._agent_manager.flush(name)

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    # -- tokens ---------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text`` (BOS added when the model asks for it, unless overridden)."""
        return self.tokenizer.encode(text, add_bos=add_bos)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """The model's chat template applied to ``messages``."""
        tok = self.tokenizer
        return render_chat(
            tok.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
        )

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template, ready for a reply.

        BOS is added when the model asks for it and the template did not write it already.
        """
        return self.tokenizer.encode(self.render_chat(messages))

    # -- forward passes ---------------------------------------------------------------------
    def _check_fits(self, n_prompt: int) -> None:
        if n_prompt == 0:
            raise ValueError("the prompt is empty (no tokens to condition on)")
        if n_prompt >= self.context_length:
            raise ContextLengthError(
                f"prompt has {n_prompt} tokens but the model's context is {self.context_length} "
                f"tokens (at most {self.context_length - 1} leave room for an answer)"
            )

    def _prefill(self, ids: Sequence[int], cache: Any, all_logits: bool = False) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        outs = []
        for start in range(0, len(arr), self.prefill_chunk):
            chunk = arr[start : start + self.prefill_chunk]
            last = start + self.prefill_chunk >= len(arr)
            out = self.backend.forward(chunk, cache, all_logits=all_logits)
            if all_logits:
                outs.append(log_softmax(out))
            elif last:
                outs.append(out)
        return np.concatenate(outs) if all_logits else outs[-1][-1]

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token log-probabilities after every position of ``ids``: float32 [len, vocab]."""
        if len(ids) > self.context_length:
            raise ContextLengthError(
                f"{len(ids)} tokens exceed the model's context of {self.context_length}"
            )
        if len(ids) == 0:
            return np.zeros((0, self.model.config.vocab_size), dtype=np.float32)
        return self._prefill(ids, self.backend.new_cache(), all_logits=True)

    # -- generation ---------------------------------------------------------------------
    def generate_tokens(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        *,
        cache: Any = None,
        usage: Usage | None = None,
        **kwargs: Any,
    ) -> Iterator[tuple[int | None, str]]:
        """Yield (token id, new text) per generated token, then (None, rest) if text was held
        back (a possible stop string or a split multi-byte character).

        With ``cache`` (holding the first ``cache.length`` ids of ``prompt_ids``) only the rest
        is prefilled, and the cache keeps the generated tokens' K/V. ``usage`` (or
        ``last_usage``) is filled in as the generator runs.
        """
        p = SamplingParams.from_kwargs(params, **kwargs)
        if cache is None:
            cache = self.backend.new_cache()
        usage = usage if usage is not None else Usage()
        self.last_usage = usage
        yield from Generation(self, prompt_ids, p, cache, usage).run()

    def stream(
        self, prompt: str, params: SamplingParams | None = None, **kwargs: Any
    ) -> Iterator[str]:
        """Plain completion of ``prompt`` (no chat template), streamed as text pieces."""
        for _, text in self.generate_tokens(self.tokenize(prompt), params, **kwargs):
            if text:
                yield text

    def generate(self, prompt: str, params: SamplingParams | None = None, **kwargs: Any) -> str:
        """Plain completion of ``prompt`` as one string."""
        return "".join(self.stream(prompt, params, **kwargs))

    def stream_chat(
        self, messages: list[dict[str, Any]], params: SamplingParams | None = None, **kwargs: Any
    ) -> Iterator[str]:
        """The assistant's reply to ``messages`` (chat template applied), streamed."""
        for _, text in self.generate_tokens(self.chat_ids(messages), params, **kwargs):
            if text:
                yield text

    def chat(
        self, messages: list[dict[str, Any]], params: SamplingParams | None = None, **kwargs: Any
    ) -> str:
        """The assistant's reply to ``messages`` as one string."""
        return "".join(self.stream_chat(messages, params, **kwargs))
