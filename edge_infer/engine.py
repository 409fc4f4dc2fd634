"""The engine: loads a model, builds its runner and its agent manager, and offers both."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_infer.agents.agent import Agent
from edge_infer.agents.manager import AgentManager
from edge_infer.agents.state import AgentInfo
from edge_infer.agents.turn import AgentTurn
from edge_infer.backends.base import Backend
from edge_infer.backends.select import create_backend
from edge_infer.cache_store import AgentStore, KVFormat
from edge_infer.config import cache_root, default_backend
from edge_infer.generation.runner import DEFAULT_PREFILL_CHUNK, Runner
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import Generation, Usage
from edge_infer.models.fingerprint import Fingerprint
from edge_infer.models.loader import load_model
from edge_infer.models.spec import LoadedModel


def agent_store(model: LoadedModel, backend: Backend) -> AgentStore:
    """The store for ``model``'s agents with ``backend``'s KV format, under the cache root."""
    fmt = KVFormat(bits=backend.kv_bits, group_size=backend.kv_group_size)
    fingerprint = Fingerprint.of(**model.fingerprint_parts, kv_format=fmt.fingerprint_tag())
    return AgentStore(
        cache_root(),
        fingerprint,
        fmt,
        model_record={"name": model.name, "source": str(model.source)},
    )


class Engine:
    """A loaded model on a backend. Create with :meth:`Engine.load`."""

    def __init__(
        self, model: LoadedModel, backend: Backend, prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    ) -> None:
        self.model = model
        self.backend = backend
        self.tokenizer = model.tokenizer
        self.runner = Runner(
            backend, model.tokenizer, model.config.context_length, prefill_chunk
        )
        self.agent_manager = AgentManager(self.runner, agent_store(model, backend))
        self.last_usage = Usage()

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

    @property
    def prefill_chunk(self) -> int:
        return self.runner.prefill_chunk

    @property
    def context_length(self) -> int:
        return self.runner.context_length

    # -- agents ---------------------------------------------------------------------------------
    def agent(self, name: str, system: str | None = None, overflow: str | None = None) -> Agent:
        """Agent ``name``: created, or restored from its cache on disk. ``system`` sets its
        system prompt; ``overflow="drop_oldest"`` drops the oldest turns instead of failing
        when the conversation outgrows the context."""
        return self.agent_manager.agent(name, system=system, overflow=overflow)

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
        return self.agent_manager.chat_many(requests, params, kwargs)

    def start_prefix_turn(
        self, name: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> AgentTurn:
        """Begin generating after ``prompt_ids`` on the persistent KV cache ``name`` (stored
        like an agent's, but holding no conversation): the longest token prefix it shares
        with the prompt is reused. Drive it like :meth:`Agent.start_turn`'s turn."""
        return self.agent_manager.begin_prefix_turn(name, list(prompt_ids), params)

    def agents(self) -> list[AgentInfo]:
        """Agents in memory or on disk: tokens held, bytes in memory and on disk, last use."""
        return self.agent_manager.list()

    def has_agent(self, name: str) -> bool:
        """Whether agent ``name`` exists (in memory or with a cache on disk)."""
        return self.agent_manager.exists(name)

    def delete_agent(self, name: str) -> bool:
        """Delete agent ``name`` from memory and disk; True if it existed."""
        return self.agent_manager.delete(name)

    def flush(self, name: str | None = None) -> None:
        """Wait until agents' caches (``name``'s, or all) are written to disk."""
        self.agent_manager.flush(name)

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
        return self.runner.render_chat(messages, add_generation_prompt)

    def chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template, ready for a reply.

        BOS is added when the model asks for it and the template did not write it already.
        """
        return self.runner.chat_ids(messages)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token log-probabilities after every position of ``ids``: float32 [len, vocab]."""
        return self.runner.logits(ids)

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
            cache = self.runner.new_cache()
        usage = usage if usage is not None else Usage()
        self.last_usage = usage
        yield from Generation(self.runner, prompt_ids, p, cache, usage).run()

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
