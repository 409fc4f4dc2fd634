"""Per-agent KV caches for one model: hot (live), warm (block pool / disk), prefix reuse."""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from datetime import datetime
from typing import Any

import numpy as np

from edge_infer.agents.agent import Agent, as_messages
from edge_infer.agents.images import ImagePrompt, ImageRender, image_parts
from edge_infer.agents.saver import BackgroundSaver
from edge_infer.agents.state import (
    OVERFLOW_POLICIES,
    AgentInfo,
    AgentState,
    fit_messages,
    reuse_cached_spelling,
)
from edge_infer.agents.turn import AgentTurn
from edge_infer.backends.base import KVCache
from edge_infer.cache_store import (
    AgentStore,
    BlockPool,
    KVBlock,
    QuantizedKV,
    StoredAgent,
    common_prefix_len,
    default_budget_bytes,
    validate_agent_name,
)
from edge_infer.cache_store.blocks import maps_a_file
from edge_infer.cache_store.kv_format import row_nbytes
from edge_infer.errors import EdgeInferError
from edge_infer.generation.batch import decode_together
from edge_infer.generation.runner import Runner
from edge_infer.generation.sampling import SamplingParams
from edge_infer.generation.sequence import Generation, Usage
from edge_infer.generation.tools import Tool
from edge_infer.offload.index import PageIndex, SparseState
from edge_infer.offload.settings import OffloadSettings

log = logging.getLogger("edge_infer.cache")

# Live backend caches kept (float working copies); other agents wait as quantized blocks.
MAX_LIVE_CACHES = 2


class AgentManager:
    """Owns the agents of one model: their states, the block pool, the store, the saver.

    ``runner`` computes their KV; ``store`` persists it (its format is the runner's caches').
    """

    def __init__(
        self,
        runner: Runner,
        store: AgentStore,
        pool_bytes: int | None = None,
        images: ImageRender | None = None,
        offload: OffloadSettings | None = None,
    ) -> None:
        self.images = images  # renders a conversation with images (a VLM's engine gives it)
        self.offload = offload  # None: every agent's KV stays in memory
        self.runner = runner
        self.store = store
        self.fmt = store.fmt
        self.pool = BlockPool(pool_bytes or default_budget_bytes())
        self.saver = BackgroundSaver()
        self._states: dict[str, AgentState] = {}
        self._usage: dict[str, Usage] = {}
        self._live: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.RLock()
        atexit.register(self.saver.flush)

    # -- lookup -----------------------------------------------------------------------------
    def agent(
        self,
        name: str,
        system: str | None = None,
        overflow: str | None = None,
        offload: bool | None = None,
    ) -> Agent:
        """Get or create agent ``name`` (restored from disk when it has a cache there).
        ``offload``: keep its KV in the tiers (True), in memory (False), or decide by the
        budget (None, the default; a setting given before is kept)."""
        validate_agent_name(name)
        if overflow is not None and overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES} (got {overflow!r})")
        if offload and self.offload is None:
            raise ValueError(
                "offload=True needs a host-memory budget for KV: load the engine with "
                "kv_memory (for example Engine.load(kv_memory='256MB') or --kv-memory 256MB)"
            )
        st = self.state(name)
        with st.lock:
            if offload is not None and offload != st.extra.get("offload"):
                st.extra["offload"] = offload
                self._persist(name, st)
            if overflow is not None and overflow != st.extra.get("overflow", "error"):
                st.extra["overflow"] = overflow
                self._persist(name, st)
            if system is not None and system != (st.extra.get("system") or ""):
                has_system = bool(st.messages) and st.messages[0]["role"] == "system"
                if has_system:
                    del st.messages[0]
                if system:
                    st.extra["system"] = system
                    st.messages.insert(0, {"role": "system", "content": system})
                else:
                    st.extra.pop("system", None)
                self._persist(name, st)  # the cache is cut to the new prefix at the next turn
        return Agent(self, name)

    def state(self, name: str) -> AgentState:
        """The agent's state, loading it from the pool or disk the first time."""
        with self._lock:
            st = self._states.get(name)
            if st is None:
                st = self._states[name] = self._load(name)
            return st

    def _load(self, name: str, verify: bool | None = None) -> AgentState:
        st = AgentState()
        if verify is None:
            # with offloading, block files are mapped, not read: an offloaded agent reads only
            # the pages attention asks for; their hashes are checked on a thread meanwhile
            verify = self.offload is None
        snap = self.store.load(name, verify=verify)
        if snap is None:
            mismatched = self.store.find_mismatched(name)
            if mismatched:
                parts = sorted({p for _, diff in mismatched for p in diff})
                log.warning(
                    "agent %r has a cache made with another model or KV format (differs in: %s);"
                    " starting it fresh",
                    name,
                    ", ".join(parts),
                )
            return st
        st.messages = list(snap.messages)
        st.extra = dict(snap.extra)
        st.blocks = list(snap.blocks)
        st.token_ids = list(snap.token_ids[: snap.valid_tokens])
        st.files = list(snap.files)
        self.pool.put(name, st.blocks)
        if not snap.verified and snap.blocks:
            threading.Thread(target=self._verify, args=(name, st), daemon=True).start()
        return st

    def _verify(self, name: str, st: AgentState) -> None:
        """Hash the files of an agent loaded unverified; any that fail make its next turn
        load it again, verified (which sets the bad files aside)."""
        try:
            bad = self.store.corrupt_files(name)
        except Exception as e:  # noqa: BLE001 - a thread must not die silently
            log.warning("agent %r: its block files could not be verified (%s)", name, e)
            bad = ["?"]
        if bad:
            log.warning("agent %r: block file(s) %s fail their hash", name, ", ".join(bad))
            st.suspect = True

    def _refresh(self, name: str, st: AgentState) -> None:
        """Reload the agent from disk if another process saved it since this one did."""
        if st.suspect:
            fresh = self._load(name, verify=True)  # bad files are set aside
            st.suspect = False
        elif self.saver.has_pending(name) or not self.store.changed_elsewhere(name):
            return
        else:
            log.info("agent %r was saved by another process; continuing from its version", name)
            fresh = self._load(name)
        st.messages, st.extra, st.files = fresh.messages, fresh.extra, fresh.files
        st.blocks, st.token_ids, st.cache = fresh.blocks, fresh.token_ids, None
        st.tiers = st.sparse = None
        with self._lock:
            self._live.pop(name, None)
        if not st.blocks:
            self.pool.remove(name)

    def usage(self, name: str) -> Usage:
        """The last turn's usage of agent ``name`` (zeros before its first turn)."""
        return self._usage.get(name) or Usage()

    # -- the live cache ---------------------------------------------------------------------------
    def _live_cache(self, name: str, st: AgentState) -> KVCache:
        if st.cache is None:
            cache = self.runner.new_cache()
            st.tiers = st.sparse = None
            if self._wants_offload(st, len(st.token_ids)):
                self._offload(name, st, cache)
            if st.blocks:
                cache.append_blocks(st.blocks)
            st.cache = cache
            st.token_ids = st.token_ids[: cache.length]
        with self._lock:
            self._live[name] = None
            self._live.move_to_end(name)
            # drop the oldest idle working copies; agents in a turn keep theirs
            for old in list(self._live):
                if len(self._live) <= MAX_LIVE_CACHES:
                    break
                other = self._states.get(old)
                if other is None or (other is not st and not other.busy):
                    self._live.pop(old)
                    if other is not None:
                        other.cache = None  # its blocks stay in the pool and on disk
                        other.tiers = other.sparse = None
        return st.cache

    # -- offloading ------------------------------------------------------------------------------
    def _kv_bytes(self, tokens: int) -> int:
        """Bytes ``tokens`` tokens of KV take in the store's format (keys and values)."""
        cfg = self.runner.backend.config
        d, group = cfg.head_dim, self.fmt.group_size
        rows = sum(row_nbytes(self.fmt.bits_of(i), d, group) for i in range(cfg.num_layers))
        return tokens * cfg.num_kv_heads * 2 * rows

    def _wants_offload(self, st: AgentState, tokens: int) -> bool:
        if self.offload is None or st.tiers is not None:
            return False
        return self.offload.wants(st.extra.get("offload"), self._kv_bytes(tokens))

    def _offload(self, name: str, st: AgentState, cache: KVCache) -> None:
        """Move ``cache``'s offloadable layers into new tiers; its decoding attends the
        pages the policy selects, ranked by the page index kept beside the agent's blocks
        (rebuilt from the blocks when missing or stale)."""
        assert self.offload is not None
        settings = self.offload
        n_layers = len(cache.windows)
        sparse = SparseState.new(settings.policy, n_layers)
        index = PageIndex.load(
            self.store.page_index_path(name),
            st.files,
            n_layers,
            settings.policy.page,
            self.fmt.block_size,
        )
        if index is not None:
            sparse.index = index
        tiers = settings.tiers(cache.windows, self.fmt.block_size)
        cache.offload(tiers, sparse)
        st.tiers, st.sparse = tiers, sparse

    def _sync_blocks(self, name: str, st: AgentState, cache: KVCache, first_changed: int) -> None:
        """Re-export blocks from the one holding ``first_changed`` and persist in background."""
        bs = self.fmt.block_size
        keep = first_changed // bs
        st.blocks = st.blocks[:keep] + cache.blocks(keep * bs)
        st.last_used = time.time()
        self.pool.put(name, st.blocks)
        self.pool.evict_to_budget()
        self._persist(name, st)

    def _persist(self, name: str, st: AgentState) -> None:
        """Save a snapshot of the agent's state on the background saver (and an offloaded
        agent's page index beside it)."""
        ids, blocks = list(st.token_ids), list(st.blocks)
        messages, extra = [dict(m) for m in st.messages], dict(st.extra)
        index = st.sparse.index.snapshot() if st.sparse is not None else None
        bs = self.fmt.block_size

        def save() -> None:
            m = self.store.save(name, ids, blocks, messages=messages, extra=extra)
            st.files = [e.file for e in m.blocks]
            if index is not None and index.covered() >= bs:
                files = [e.file for e in m.blocks if e.sealed][: index.covered() // bs]
                index.truncate(len(files) * bs)
                if files:
                    index.save(self.store.page_index_path(name), files)

        self.saver.submit(name, save)

    def _prepare(
        self,
        name: str,
        st: AgentState,
        messages: list[dict[str, Any]],
        tools: Sequence[Tool] = (),
    ) -> tuple[KVCache, list[int], list[dict[str, Any]], ImagePrompt | None]:
        """Fit ``messages`` to the context, render them (with ``tools``), and cut the cache to
        the shared prefix; with images, only where each cached image has the same key."""
        limit = self.runner.context_length
        prompt = None
        if any(image_parts(m) for m in messages):
            if self.images is None:
                raise ValueError("this engine takes no images")
            render = self.images
            messages, _ = fit_messages(
                lambda m: render(m, tools).ids, messages, limit, st.extra.get("overflow", "error")
            )
            prompt = render(messages, tools)  # the image side keeps recent encodings
            ids = prompt.ids
        else:
            messages, ids = fit_messages(
                lambda m: self.runner.chat_ids(m, tools=tools),
                messages,
                limit,
                st.extra.get("overflow", "error"),
            )
        cache = self._live_cache(name, st)
        if self._wants_offload(st, len(ids)):  # this prompt takes it over the budget
            self._offload(name, st, cache)
        if prompt is None:
            ids = reuse_cached_spelling(st.token_ids, ids, self.runner.tokenizer.token_bytes)
        keep = common_prefix_len(st.token_ids, ids)
        keep = (prompt or ImagePrompt()).reusable(st.extra.get("images", []), keep)
        keep = cache.truncate(min(keep, len(ids) - 1))
        st.token_ids = st.token_ids[:keep]
        st.extra["images"] = [list(x) for x in prompt.images] if prompt else []
        if prompt is not None:  # the image embeddings go in now; the generation does the rest
            segments = prompt.segments_from(cache.length)
            if segments:
                self.runner.prefill_segments(segments, cache)
        return cache, ids, messages, prompt

    # -- turns -----------------------------------------------------------------------------
    def begin_turn(
        self,
        name: str,
        new_messages: list[dict[str, Any]],
        params: SamplingParams | None,
        kwargs: dict[str, Any],
        keep_messages: int | None = None,
        tools: Sequence[Tool] = (),
        tool_format: str | None = None,
    ) -> AgentTurn:
        """Start the reply to the agent's conversation plus ``new_messages``: the agent is
        locked, its cache cut to the shared prefix; nothing is prefilled yet.

        With ``keep_messages`` only that many of the stored messages stay before the new ones
        (a conversation edited or regenerated by the client); the KV is still reused up to
        the first token that differs. ``tools`` are rendered into the prompt; with
        ``tool_format`` the reply's tool calls are parsed and kept as ``tool_calls``."""
        st = self.state(name)
        locks = ExitStack()
        locks.enter_context(st.lock)
        try:
            locks.enter_context(self.store.lock(name))
            self._refresh(name, st)
            locks.enter_context(_busy(st))
            p = SamplingParams.from_kwargs(params, **kwargs)
            kept = st.messages if keep_messages is None else st.messages[: max(0, keep_messages)]
            cache, ids, messages, prompt = self._prepare(name, st, kept + new_messages, tools)
            first_changed = len(st.token_ids)  # the cache was cut to the shared prefix
            usage = self._usage[name] = Usage()
            gen = Generation(self.runner, ids, p, cache, usage)
            if prompt is not None:  # images were prefilled before the generation began
                usage.cached_tokens = first_changed
                usage.image_tokens = prompt.image_tokens
                usage.image_tokens_total = prompt.image_tokens_total
        except BaseException:
            locks.close()
            raise
        return AgentTurn(self, name, st, gen, messages, first_changed, locks, tool_format)

    def begin_prefix_turn(
        self,
        name: str,
        prompt_ids: list[int],
        params: SamplingParams,
        images: ImagePrompt | None = None,
    ) -> AgentTurn:
        """Start generating after ``prompt_ids`` on the persistent cache ``name``, reusing the
        longest token prefix it shares with them; no conversation is kept, only the KV of
        the prompt and the reply (for the next prompt that starts the same way).

        With ``images`` (the prompt ``prompt_ids`` come from) a cached image span is reused
        only where it holds the same image, and the image embeddings past the reused prefix
        are prefilled here."""
        if images is not None and images.ids != list(prompt_ids):
            raise ValueError("prompt_ids must be the ids of the image prompt given")
        self.runner.check_fits(len(prompt_ids))
        st = self.state(name)
        locks = ExitStack()
        locks.enter_context(st.lock)
        try:
            locks.enter_context(self.store.lock(name))
            self._refresh(name, st)
            locks.enter_context(_busy(st))
            cache = self._live_cache(name, st)
            if self._wants_offload(st, len(prompt_ids)):
                self._offload(name, st, cache)
            keep = common_prefix_len(st.token_ids, prompt_ids)
            # placeholder ids are alike for every image: a cached image span needs its key
            keep = (images or ImagePrompt()).reusable(st.extra.get("images", []), keep)
            keep = cache.truncate(min(keep, len(prompt_ids) - 1))
            st.token_ids = st.token_ids[:keep]
            st.extra["images"] = [list(x) for x in images.images] if images else []
            if images is not None:  # the embeddings go in now; the generation does the rest
                segments = images.segments_from(cache.length)
                if segments:
                    self.runner.prefill_segments(segments, cache)
            usage = self._usage[name] = Usage()
            gen = Generation(self.runner, prompt_ids, params, cache, usage)
            if images is not None:
                usage.cached_tokens = keep
                usage.image_tokens = images.image_tokens
                usage.image_tokens_total = images.image_tokens_total
        except BaseException:
            locks.close()
            raise
        return AgentTurn(self, name, st, gen, None, keep, locks)

    def end_turn(self, turn: AgentTurn) -> None:
        """Keep a turn's reply and cache in its agent's state and persist them (the turn
        still holds the agent's locks)."""
        st, g, cache = turn.state, turn.generation, turn.cache
        st.token_ids = (g.prompt_ids + g.generated)[: cache.length]
        if turn.messages is not None and not g.prefilling:  # the prompt was read
            st.messages = turn.messages + [turn.message()]
        self._sync_blocks(turn.name, st, cache, turn.first_changed)

    def turn(
        self,
        name: str,
        new_messages: list[dict[str, Any]],
        params: SamplingParams | None,
        kwargs: dict[str, Any],
    ) -> Iterator[str]:
        """Generate the reply to the agent's conversation plus ``new_messages``, streamed."""
        yield from self.begin_turn(name, new_messages, params, kwargs).stream()

    def chat_many(
        self,
        requests: Mapping[str, str | list[dict[str, Any]]],
        params: SamplingParams | None,
        kwargs: dict[str, Any],
    ) -> dict[str, str]:
        """Each named agent answers its message(s), all decoding together in batched steps."""
        turns: list[AgentTurn] = []
        try:
            for name, content in requests.items():
                turns.append(self.begin_turn(name, as_messages(content), params, kwargs))
            for i, pieces in decode_together(self.runner, [t.generation for t in turns]):
                turns[i].record(pieces)
        finally:
            for t in turns:
                t.finish()
        return {t.name: t.text for t in turns}

    def append(self, name: str, messages: list[dict[str, Any]], prefill: bool) -> None:
        """Append messages to the conversation; with ``prefill`` extend the cache now."""
        st = self.state(name)
        with st.lock, self.store.lock(name), _busy(st):
            self._refresh(name, st)
            st.messages = st.messages + [dict(m) for m in messages]
            if not prefill:
                self._persist(name, st)
                return
            st.messages, rendered = fit_messages(
                lambda m: self.runner.chat_ids(m, add_generation_prompt=False),
                st.messages,
                self.runner.context_length,
                st.extra.get("overflow", "error"),
            )
            cache = self._live_cache(name, st)
            keep = cache.truncate(common_prefix_len(st.token_ids, rendered))
            first_changed = keep
            if keep < len(rendered):
                self.runner.prefill(rendered[keep:], cache)
            st.token_ids = rendered[: cache.length]
            self._sync_blocks(name, st, cache, first_changed)

    def fork(self, name: str, new_name: str) -> Agent:
        validate_agent_name(new_name)
        if new_name in self._states or self.store.exists(new_name):
            raise EdgeInferError(f"agent {new_name!r} already exists")
        src = self.state(name)
        with src.lock:
            self.flush(name)
            st = AgentState(
                messages=[dict(m) for m in src.messages],
                extra=dict(src.extra),
                token_ids=list(src.token_ids),
                blocks=list(src.blocks),
            )
        with self._lock:
            self._states[new_name] = st
        with st.lock:
            st.last_used = time.time()
            self.pool.put(new_name, st.blocks)
            self._persist(new_name, st)
        return Agent(self, new_name)

    def reset(self, name: str) -> None:
        st = self.state(name)
        with st.lock, self.store.lock(name):
            system = st.extra.get("system")
            st.messages = [{"role": "system", "content": system}] if system else []
            if st.cache is not None:
                st.cache.truncate(0)
            st.token_ids, st.blocks = [], []
            self.pool.remove(name)
            self._persist(name, st)

    def exists(self, name: str) -> bool:
        """Whether agent ``name`` is in memory or has a cache on disk."""
        validate_agent_name(name)
        with self._lock:
            if name in self._states:
                return True
        return self.store.exists(name)

    def delete(self, name: str) -> bool:
        """Forget ``name`` in memory and on disk; True if it existed (waits for its turn)."""
        validate_agent_name(name)
        with self._lock:
            st = self._states.get(name)
        with st.lock if st is not None else contextlib.nullcontext():
            self.flush(name)
            with self._lock:
                existed = self._states.pop(name, None) is not None
                self._live.pop(name, None)
            self.pool.remove(name)
            return self.store.delete(name) or existed

    def list(self) -> list[AgentInfo]:
        """Agents in memory or on disk, with tokens held and bytes used."""
        self.flush()
        on_disk = {a.name: a for a in self.store.list_agents()}
        names = sorted(set(on_disk) | set(self._states))
        out = []
        for n in names:
            st = self._states.get(n)
            disk = on_disk.get(n)
            tiers = st.tiers if st is not None else None
            out.append(
                AgentInfo(
                    name=n,
                    tokens=len(st.token_ids) if st else (disk.tokens if disk else 0),
                    bytes_in_memory=_held_bytes(st.blocks) if st else 0,
                    bytes_on_disk=disk.bytes_on_disk if disk else 0,
                    last_used=st.last_used if st and st.last_used else _timestamp(disk),
                    messages=len(st.messages) if st else (disk.messages if disk else 0),
                    offloaded=tiers is not None,
                    kv_ram_bytes=tiers.nbytes_ram() if tiers is not None else 0,
                    kv_disk_bytes=tiers.nbytes_disk() if tiers is not None else 0,
                    hit_rate=tiers.counters.hit_rate if tiers is not None else None,
                )
            )
        return out

    def flush(self, name: str | None = None) -> None:
        """Wait until agents' caches (``name``'s, or all) are written to disk."""
        self.saver.flush(name)


def _held_bytes(blocks: Sequence[KVBlock]) -> int:
    """Bytes of ``blocks`` held in memory (blocks that map their file are on disk)."""
    return sum(b.nbytes for b in blocks if not b.layers or not _mapped(b.layers[0].keys))


def _mapped(kv: QuantizedKV | np.ndarray) -> bool:
    return maps_a_file(kv.packed if isinstance(kv, QuantizedKV) else kv)


@contextlib.contextmanager
def _busy(st: AgentState) -> Iterator[None]:
    """Mark ``st`` as in a turn, so its working copy is not evicted under it."""
    st.busy += 1
    try:
        yield
    finally:
        st.busy -= 1


def _timestamp(info: StoredAgent | None) -> float:
    try:
        return datetime.fromisoformat(info.updated).timestamp() if info else 0.0
    except (TypeError, ValueError):
        return 0.0
