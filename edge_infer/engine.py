"""The engine: loads a model, builds its runner and its agent manager, and offers both."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edge_infer.agents.agent import Agent
from edge_infer.agents.images import ImagePrompt, ImageSource, image_parts, image_source
from edge_infer.agents.manager import AgentManager
from edge_infer.agents.state import AgentInfo
from edge_infer.agents.turn import AgentTurn
from edge_infer.backends.base import Backend
from edge_infer.backends.select import create_backend
from edge_infer.cache_store import AgentStore, KVFormat
from edge_infer.cache_store.kv_format import layer_bits
from edge_infer.config import cache_root, default_backend, kv_memory_setting, parse_bytes
from edge_infer.generation.runner import DEFAULT_PREFILL_CHUNK, Runner
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import Generation, Usage
from edge_infer.generation.tools import Tool, prompt_messages
from edge_infer.models.chat_template import render_chat_parts
from edge_infer.models.fingerprint import Fingerprint
from edge_infer.models.gguf.mmproj import read_mmproj
from edge_infer.models.loader import load_model
from edge_infer.models.spec import LoadedModel
from edge_infer.offload.settings import DEFAULT_POLICY, OffloadSettings
from edge_infer.offload.tiers import HostPool
from edge_infer.vision.dropping import Budget
from edge_infer.vision.preprocess import ImageSpec, preprocess
from edge_infer.vision.prompt import IMAGE, image_key, image_prompt
from edge_infer.vision.tower import VisionTower, load_tower

METHODS = ("full", "hired", "uniform", "cls-topk")
_SENTINEL = "\ue000image\ue000"  # stands for an image part while the chat is rendered


def is_vlm_dir(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face VLM directory (its config has a vision side)."""
    cfg = path / "config.json"
    return path.is_dir() and cfg.is_file() and "vision_config" in json.loads(cfg.read_text())


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system: glibc keeps freed blocks below its
    mmap threshold (a model's per-layer arrays) for reuse, so they would still count as the
    process's memory. Elsewhere this does nothing."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def mmproj_image_spec(path: Path) -> ImageSpec:
    """Preprocessing for an mmproj file: its tower's side, mean and std (no preprocessor file),
    and LLaVA-NeXT's tile canvases."""
    mm = read_mmproj(path)
    side = int(mm.config["vision_config"]["image_size"])
    kind = {"idefics3": "idefics3", "llava_next": "llava_next"}.get(mm.config["model_type"], "clip")
    return ImageSpec(
        kind=kind,
        mean=mm.image_mean,
        std=mm.image_std,
        size={"longest_edge": side} if kind == "idefics3" else {"shortest_edge": side},
        crop=(side, side),
        tile=side,
        pinpoints=tuple(tuple(p) for p in mm.config.get("image_grid_pinpoints", ())),
    )


class Vision:
    """A VLM's image side beside the runner: its tower, preprocessing and dropping settings."""

    def __init__(
        self,
        model: VisionTower,
        image_spec: ImageSpec,
        method: str = "hired",
        budget: Budget | None = None,
        mode: str = "spatial",
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"visual method must be one of {METHODS}, got {method!r}")
        self.model, self.image_spec = model, image_spec
        self.method, self.budget, self.mode = method, budget or Budget(), mode
        self.recent: dict[str, tuple[np.ndarray, str, str, int]] = {}

    def encode(
        self, src: ImageSource, rate: float | None = None, method: str | None = None
    ) -> tuple[np.ndarray, str, str, int]:
        """(embeddings [kept, hidden] in prompt order, placeholder text, image key, total)."""
        method = method or self.method
        budget = self.budget if rate is None else Budget(rate, self.budget.alpha)
        px = preprocess(src, self.image_spec)
        key = image_key(px, method, budget, self.mode)
        if key in self.recent:  # an agent's history renders its images again each turn
            return self.recent[key]
        enc = self.model.encode(px, method, budget, self.mode)
        kept = (
            [len(enc.embeds)]
            if self.model.spec.arch == "llava_next"
            else [len(k) for k in enc.kept]
        )
        text = image_prompt(self.model.spec.arch, px, kept)
        embeds = enc.numpy_embeds()
        self.recent[key] = (embeds, text, key, enc.total)
        while len(self.recent) > 8:
            self.recent.pop(next(iter(self.recent)))
        return self.recent[key]


def agent_store(model: LoadedModel, backend: Backend) -> AgentStore:
    """The store for ``model``'s agents with ``backend``'s KV format, under the cache root."""
    fmt = KVFormat(
        bits=backend.kv_bits,
        group_size=backend.kv_group_size,
        layer_bits=layer_bits(backend.kv_bits, model.config.layer_windows()),
    )
    fingerprint = Fingerprint.of(**model.fingerprint_parts, kv_format=fmt.fingerprint_tag())
    return AgentStore(
        cache_root(),
        fingerprint,
        fmt,
        model_record={"name": model.name, "source": str(model.source)},
    )


def offload_settings(
    kv_memory: str | int | None, kv_sparsity: float | None = None
) -> OffloadSettings | None:
    """The offloading ``Engine.load`` sets up for a ``kv_memory`` budget (None: none, unless
    ``EDGE_INFER_KV_MEMORY`` gives one)."""
    if kv_memory is None:
        kv_memory = kv_memory_setting()
    if kv_memory is None:
        if kv_sparsity is not None:
            raise ValueError("kv_sparsity applies to offloaded agents: give kv_memory too")
        return None
    pool = HostPool(parse_bytes(kv_memory, "kv_memory"))
    policy = DEFAULT_POLICY
    if kv_sparsity is not None:
        if not 0.0 < kv_sparsity <= 1.0:
            raise ValueError(f"kv_sparsity must be in (0, 1], got {kv_sparsity}")
        policy = dataclasses.replace(policy, budget=kv_sparsity)
    return OffloadSettings(pool, policy)


class Engine:
    """A loaded model on a backend. Create with :meth:`Engine.load`."""

    def __init__(
        self,
        model: LoadedModel,
        backend: Backend,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        vision: Vision | None = None,
        offload: OffloadSettings | None = None,
    ) -> None:
        self.model = model
        self.vision = vision
        self.backend = backend
        self.tokenizer = model.tokenizer
        self.runner = Runner(backend, model.tokenizer, model.config.context_length, prefill_chunk)
        self.agent_manager = AgentManager(
            self.runner, agent_store(model, backend), images=self.agent_images, offload=offload
        )
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
        mmproj: str | Path | None = None,
        visual_method: str = "hired",
        visual_budget: float = 0.2,
        visual_alpha: float = 0.5,
        kv_memory: str | int | None = None,
        kv_sparsity: float | None = None,
    ) -> Engine:
        """Load ``model`` (a .gguf file or a Hugging Face/MLX directory; None = the embedded
        default) on ``backend`` ("auto", "torch" or "mlx"). KV caches hold keys and values in
        ``kv_bits`` (4 = default, 8, or 16 = float16).

        A VLM directory (or a text model with its llama.cpp ``mmproj`` file) also loads the
        image side, on the backend's framework; ``visual_method`` ("full", "hired",
        "uniform", "cls-topk") and ``visual_budget`` (r, the share of image tokens kept) set
        the dropping.

        ``kv_memory`` ("256MB", bytes, or ``EDGE_INFER_KV_MEMORY``) is a host-memory budget
        for agents' KV: an agent whose KV would not fit is offloaded (its layers past the
        first two kept in that pool and on disk), and decodes attending ``kv_sparsity`` of
        its pages (default 0.5), the ones that can matter most to each step."""
        if visual_method not in METHODS:  # before the weights load, not after
            raise ValueError(f"visual method must be one of {METHODS}, got {visual_method!r}")
        offload = offload_settings(kv_memory, kv_sparsity)
        if offload is not None and (backend or default_backend()) == "mlx":
            raise ValueError(
                "kv_memory (offloading KV to host memory and disk) needs the torch backend"
            )
        loaded = load_model(model, progress=progress)
        be = create_backend(
            loaded,
            backend or default_backend(),
            device=device,
            kv_bits=kv_bits,
            kv_group_size=kv_group_size,
        )
        vision = None
        budget = Budget(visual_budget, visual_alpha)
        if mmproj is not None:
            vision = Vision(
                load_tower(Path(mmproj), be.name, be.device),
                mmproj_image_spec(Path(mmproj)),
                visual_method,
                budget,
            )
        elif model is not None and is_vlm_dir(Path(model)):
            vision = Vision(
                load_tower(Path(model), be.name, be.device),
                ImageSpec.from_dir(Path(model)),
                visual_method,
                budget,
            )
        # the backend holds the weights in its own form now; the loader's copy would double
        # the model's memory for as long as the engine lives
        loaded = dataclasses.replace(loaded, weights={})
        return_freed_memory()
        if offload is not None and be.name == "torch" and be.device != "cpu":
            raise ValueError(
                f"kv_memory (offloading KV to host memory and disk) runs on the CPU; this "
                f"engine is on {be.device} (load it with device='cpu')"
            )
        if offload is not None and be.name != "torch":
            raise ValueError(
                f"kv_memory (offloading KV to host memory and disk) needs the torch backend, "
                f"not {be.name}"
            )
        return cls(loaded, be, prefill_chunk=prefill_chunk, vision=vision, offload=offload)

    @property
    def kv_memory(self) -> int | None:
        """The host-memory budget for offloaded KV in bytes (None: agents stay in memory)."""
        offload = self.agent_manager.offload
        return offload.pool.budget_bytes if offload is not None else None

    @property
    def prefill_chunk(self) -> int:
        return self.runner.prefill_chunk

    @property
    def context_length(self) -> int:
        return self.runner.context_length

    # -- agents ---------------------------------------------------------------------------------
    def agent(
        self,
        name: str,
        system: str | None = None,
        overflow: str | None = None,
        offload: bool | None = None,
    ) -> Agent:
        """Agent ``name``: created, or restored from its cache on disk. ``system`` sets its
        system prompt; ``overflow="drop_oldest"`` drops the oldest turns instead of failing
        when the conversation outgrows the context; ``offload`` keeps its KV in the
        ``kv_memory`` pool and on disk (True), in memory (False), or lets the budget decide
        (None)."""
        return self.agent_manager.agent(name, system=system, overflow=overflow, offload=offload)

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
        self,
        name: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        images: ImagePrompt | None = None,
    ) -> AgentTurn:
        """Begin generating after ``prompt_ids`` on the persistent KV cache ``name`` (stored
        like an agent's, but holding no conversation): the longest token prefix it shares
        with the prompt is reused. With ``images`` (from :meth:`image_chat`, whose ids
        ``prompt_ids`` are) a cached image span is reused only for the same image. Drive it
        like :meth:`Agent.start_turn`'s turn."""
        return self.agent_manager.begin_prefix_turn(name, list(prompt_ids), params, images)

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
        self,
        messages: list[dict[str, Any]],
        params: SamplingParams | None = None,
        *,
        visual_budget: float | None = None,
        visual_method: str | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        """The assistant's reply to ``messages`` (chat template applied), streamed.

        Content parts ``{"type": "image_url", "image_url": {"url": ...}}`` (a data: URI or a
        path) or ``{"type": "image", "image": path_or_PIL}`` put images in the prompt;
        ``visual_budget`` overrides the share of image tokens kept for this call."""
        if not any(image_parts(m) for m in messages):
            pieces = self.generate_tokens(self.chat_ids(messages), params, **kwargs)
        else:
            prompt = self.image_chat(messages, visual_budget, visual_method)
            pieces = self.generate_image_tokens(prompt, params, **kwargs)
        for _, text in pieces:
            if text:
                yield text

    # -- images ---------------------------------------------------------------------------
    def image_chat(
        self,
        messages: list[dict[str, Any]],
        rate: float | None = None,
        method: str | None = None,
        *,
        tools: Sequence[Tool] = (),
    ) -> ImagePrompt:
        """``messages`` with image parts as one prompt: token ids (image positions hold the
        image token), prefill segments (ids, or image embeddings) and each image's key.

        ``tools``, earlier calls and tool results are rendered as :meth:`Runner.chat_ids`
        renders them for a text-only chat."""
        if self.vision is None:
            raise ValueError(
                f"{self.model.name}: a text-only model takes no images "
                "(load a VLM directory, or a GGUF with mmproj=)"
            )
        tok = self.tokenizer
        images: list[ImageSource] = []
        flat = []
        for m in messages:
            parts = image_parts(m)
            if not parts:
                flat.append(m)
                continue
            text = []
            for part in m["content"]:
                if part in parts:
                    images.append(image_source(part))
                    text.append(_SENTINEL)
                else:
                    text.append(str(part.get("text", "")))
            flat.append({**m, "content": "".join(text)})
        flat, extra = prompt_messages(flat, tools, tok.chat_template)
        rendered = render_chat_parts(
            tok.chat_template,
            flat,
            tok.special_texts,
            add_generation_prompt=True,
            bos_token=tok.bos_token,
            eos_token=tok.eos_token,
            **extra,
        )
        groups: list[list[tuple[str, bool]]] = [[]]
        for text, markup in rendered:
            if markup:
                groups[-1].append((text, True))
                continue
            for i, piece in enumerate(text.split(_SENTINEL)):
                if i:
                    groups.append([])
                if piece:
                    groups[-1].append((piece, False))
        out = ImagePrompt()
        out.add_ids(tok.encode_parts(groups[0]))
        image_id = (
            tok.encode_parts([(IMAGE, True)], add_bos=False)[0]
            if IMAGE in tok.special_texts
            else self.vision.model.spec.image_token_id
        )
        for src, group in zip(images, groups[1:], strict=True):
            embeds, text, key, total = self.vision.encode(src, rate, method)
            start, used = len(out.ids), 0
            for piece in re.split(f"((?:{re.escape(IMAGE)})+)", text):
                if piece.startswith(IMAGE):
                    n = len(piece) // len(IMAGE)
                    out.add_embeds(embeds[used : used + n], image_id)
                    used += n
                elif piece:
                    markup = piece in tok.special_texts
                    out.add_ids(tok.encode_parts([(piece, markup)], add_bos=False))
            out.images.append((start, len(out.ids), key))
            out.image_tokens += used
            out.image_tokens_total += total
            out.add_ids(tok.encode_parts(group, add_bos=False) if group else [])
        return out

    def agent_images(
        self, messages: list[dict[str, Any]], tools: Sequence[Tool] = ()
    ) -> ImagePrompt:
        """An agent's conversation with images as one prompt (the engine's dropping settings;
        ``tools`` rendered in)."""
        return self.image_chat(messages, tools=tools)

    def generate_image_tokens(
        self,
        prompt: ImagePrompt,
        params: SamplingParams | None = None,
        *,
        usage: Usage | None = None,
        **kwargs: Any,
    ) -> Iterator[tuple[int | None, str]]:
        """As :meth:`generate_tokens` for a prompt with images: everything but its last token
        is prefilled segment by segment (image embeddings where the placeholders stand)."""
        p = SamplingParams.from_kwargs(params, **kwargs)
        self.runner.check_fits(len(prompt.ids))
        cache = self.runner.new_cache()
        self.runner.prefill_segments(prompt.segments_before_last(), cache)
        usage = usage if usage is not None else Usage()
        self.last_usage = usage
        gen = Generation(self.runner, prompt.ids, p, cache, usage)
        usage.cached_tokens = 0
        usage.image_tokens = prompt.image_tokens
        usage.image_tokens_total = prompt.image_tokens_total
        yield from gen.run()

    def chat(
        self, messages: list[dict[str, Any]], params: SamplingParams | None = None, **kwargs: Any
    ) -> str:
        """The assistant's reply to ``messages`` as one string."""
        return "".join(self.stream_chat(messages, params, **kwargs))
