"""The runner: a backend plus a tokenizer, with the forward-pass API everything above calls."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edge_infer.backends.base import Backend, KVCache
from edge_infer.errors import ContextLengthError
from edge_infer.generation.sampling import log_softmax
from edge_infer.generation.tools import Tool, prompt_messages
from edge_infer.models.chat_template import (
    compile_template,
    render_chat,
    render_chat_parts,
)
from edge_infer.models.tokenizer import Tokenizer

DEFAULT_PREFILL_CHUNK = 512


class Runner:
    """Runs prompts through one backend: chunked prefill, single steps, chat-template ids."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        context_length: int,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        self.backend = backend
        self.tokenizer = tokenizer
        self.context_length = context_length  # the model's: prompt and reply together
        self.prefill_chunk = prefill_chunk
        try:  # ready for the first chat; an invalid template is reported when a chat uses it
            compile_template(tokenizer.chat_template)
        except ValueError:
            pass
        _ = tokenizer.special_pattern  # compiled now, not in the first chat

    @property
    def vocab_size(self) -> int:
        """Logits per position (may exceed the tokenizer's vocabulary)."""
        return self.backend.config.vocab_size

    def new_cache(self) -> KVCache:
        """An empty KV cache for one sequence."""
        return self.backend.new_cache()

    # -- prompts ----------------------------------------------------------------------------
    def check_fits(self, n_prompt: int) -> None:
        """Raise unless a prompt of ``n_prompt`` tokens leaves room for at least one more."""
        if n_prompt == 0:
            raise ValueError("the prompt is empty (no tokens to condition on)")
        if n_prompt >= self.context_length:
            raise ContextLengthError(
                f"prompt has {n_prompt} tokens but the model's context is {self.context_length} "
                f"tokens (at most {self.context_length - 1} leave room for an answer)"
            )

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Tool] = (),
    ) -> str:
        """The model's chat template applied to ``messages`` (and ``tools``)."""
        tok = self.tokenizer
        messages, extra = prompt_messages(messages, tools, tok.chat_template)
        return render_chat(
            tok.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            **extra,
        )

    def chat_ids(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: Sequence[Tool] = (),
    ) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template (ready for a reply unless
        ``add_generation_prompt`` is False); ``tools``, earlier calls and tool results are
        rendered the template's way, or in the generic tool format where it has none.

        Only the template's own markup yields special tokens: special-token text inside the
        messages (``"<|im_start|>"`` in a user's content) is encoded as plain text, so no
        message can open or close a turn. BOS is added when the model asks for it and the
        template did not write it already.
        """
        tok = self.tokenizer
        messages, extra = prompt_messages(messages, tools, tok.chat_template)
        parts = render_chat_parts(
            tok.chat_template,
            messages,
            tok.special_texts,
            add_generation_prompt=add_generation_prompt,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            **extra,
        )
        return tok.encode_parts(parts)

    # -- forward passes ---------------------------------------------------------------------
    def prefill(self, ids: Sequence[int], cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run ``ids`` after what ``cache`` holds, ``prefill_chunk`` tokens per pass.

        Returns the last position's logits [vocab], or with ``all_logits`` the
        log-probabilities after every position [len(ids), vocab].
        """
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

    def prefill_segments(
        self, segments: Sequence[np.ndarray], cache: KVCache, all_logits: bool = False
    ) -> np.ndarray:
        """``prefill`` over consecutive segments, each token ids [T] or input embeddings
        [T, hidden] (a VLM's image features where its placeholder tokens stand)."""
        outs = []
        for seg in segments:
            seg = np.asarray(seg)
            if seg.ndim == 1:
                outs.append(self.prefill(seg, cache, all_logits=all_logits))
                continue
            for start in range(0, len(seg), self.prefill_chunk):
                out = self.backend.forward(
                    seg[start : start + self.prefill_chunk], cache, all_logits=all_logits
                )
                outs.append(log_softmax(out) if all_logits else out[-1])
        return np.concatenate(outs) if all_logits else outs[-1]

    def step(self, token: int, cache: KVCache) -> np.ndarray:
        """Logits [vocab] after one more ``token`` on ``cache``."""
        return self.backend.forward(np.asarray([token]), cache)[-1]

    def step_batch(self, tokens: Sequence[int], caches: Sequence[KVCache]) -> np.ndarray:
        """Logits [len(tokens), vocab]: one more token on each of several distinct caches, in
        one batched pass (the projections and the MLP read the weights once for all)."""
        if len(tokens) == 1:
            return self.step(tokens[0], caches[0])[None]
        return self.backend.forward_batch(tokens, caches)

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Next-token log-probabilities after every position of ``ids``: float32 [len, vocab]."""
        if len(ids) > self.context_length:
            raise ContextLengthError(
                f"{len(ids)} tokens exceed the model's context of {self.context_length}"
            )
        if len(ids) == 0:
            return np.zeros((0, self.backend.config.vocab_size), dtype=np.float32)
        return self.prefill(ids, self.backend.new_cache(), all_logits=True)
