"""Per-sequence sparse decoding state: page boxes of the sealed tokens and the step log."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as st_save

from edge_infer.cache_store.atomic_io import write_atomic
from edge_infer.offload.pages import page_bounds
from edge_infer.offload.selection import SparsePolicy

INDEX_FORMAT = "edge-infer-page-index"
INDEX_VERSION = "1"


class PageIndex:
    """Per layer, page boxes (``[n_kv, pages, D]`` min and max: float16 values, held as
    float32 so that no step converts them) of the keys of the first ``tokens(layer)``
    sealed tokens, as attention reads them; grown as blocks seal."""

    def __init__(self, n_layers: int, page: int) -> None:
        self.page = page
        self._lo: list[np.ndarray | None] = [None] * n_layers
        self._hi: list[np.ndarray | None] = [None] * n_layers

    def tokens(self, layer: int) -> int:
        """Tokens the layer's pages cover."""
        lo = self._lo[layer]
        return 0 if lo is None else lo.shape[1] * self.page

    def extend(self, layer: int, keys: np.ndarray) -> None:
        """Add the pages of keys ``[n_kv, T, D]`` that follow the covered tokens (T a
        multiple of the page size: pages never straddle the end of the sealed tokens)."""
        if keys.shape[1] % self.page:
            raise ValueError(f"{keys.shape[1]} tokens are not whole pages of {self.page}")
        if keys.shape[1] == 0:
            return
        lo, hi = (x.astype(np.float32) for x in page_bounds(keys, self.page))
        old_lo, old_hi = self._lo[layer], self._hi[layer]
        if old_lo is not None and old_hi is not None:
            lo, hi = np.concatenate([old_lo, lo], axis=1), np.concatenate([old_hi, hi], axis=1)
        self._lo[layer], self._hi[layer] = lo, hi

    def bounds(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) ``[n_kv, pages, D]`` of the layer (ValueError when empty)."""
        lo, hi = self._lo[layer], self._hi[layer]
        if lo is None or hi is None:
            raise ValueError(f"layer {layer} has no pages yet")
        return lo, hi

    def truncate(self, tokens: int) -> None:
        """Keep the pages of the first ``tokens`` tokens (whole pages only)."""
        keep = tokens // self.page
        for i, (lo, hi) in enumerate(zip(self._lo, self._hi, strict=True)):
            if lo is not None and hi is not None and lo.shape[1] > keep:
                self._lo[i] = lo[:, :keep] if keep else None
                self._hi[i] = hi[:, :keep] if keep else None

    def covered(self) -> int:
        """Tokens every layer with pages covers (0 when none has any)."""
        held = [self.tokens(i) for i, lo in enumerate(self._lo) if lo is not None]
        return min(held, default=0)

    def snapshot(self) -> PageIndex:
        """A copy that later growth or truncation of this index does not change (the page
        arrays are replaced, never written in place, so they are shared)."""
        out = PageIndex(len(self._lo), self.page)
        out._lo, out._hi = list(self._lo), list(self._hi)
        return out

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in (*self._lo, *self._hi) if x is not None)

    def save(self, path: Path, files: list[str]) -> None:
        """Write the index (crash-safe) to ``path``, recording the block files it was
        computed from (``files``: one per block its pages cover, in order)."""
        tensors = {}
        for i, (lo, hi) in enumerate(zip(self._lo, self._hi, strict=True)):
            if lo is not None and hi is not None:
                # float16 values: the conversion is exact
                tensors[f"layers.{i}.key_min"] = np.ascontiguousarray(lo, dtype=np.float16)
                tensors[f"layers.{i}.key_max"] = np.ascontiguousarray(hi, dtype=np.float16)
        meta = {
            "format": INDEX_FORMAT,
            "format_version": INDEX_VERSION,
            "page": str(self.page),
            "n_layers": str(len(self._lo)),
            "files": ",".join(files),
        }
        write_atomic(Path(path), st_save(tensors, metadata=meta))

    @classmethod
    def load(
        cls, path: Path, files: list[str], n_layers: int, page: int, block_size: int
    ) -> PageIndex | None:
        """The index at ``path`` cut to the blocks it shares with ``files`` (the agent's
        block files now, in order), or None when it is missing, corrupt, made for another
        page size or layer count, or shares no block: then it is rebuilt from the blocks."""
        try:
            with safe_open(path, framework="np") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (OSError, SafetensorError, ValueError):
            return None
        if (
            meta.get("format") != INDEX_FORMAT
            or meta.get("format_version") != INDEX_VERSION
            or meta.get("page") != str(page)
            or meta.get("n_layers") != str(n_layers)
        ):
            return None
        covered = [f for f in meta.get("files", "").split(",") if f]
        shared = 0
        while shared < min(len(covered), len(files)) and covered[shared] == files[shared]:
            shared += 1
        if not shared:
            return None
        index = cls(n_layers, page)
        want = len(covered) * block_size // page
        for i in range(n_layers):
            lo, hi = tensors.get(f"layers.{i}.key_min"), tensors.get(f"layers.{i}.key_max")
            if lo is None and hi is None:
                continue
            if (
                lo is None
                or hi is None
                or lo.dtype != np.float16
                or lo.shape != hi.shape
                or lo.ndim != 3
                or lo.shape[1] != want
            ):
                return None
            index._lo[i], index._hi[i] = lo.astype(np.float32), hi.astype(np.float32)
        index.truncate(shared * block_size)
        return index


@dataclass
class StepRecord:
    """What one layer of one sparse decode step attended.

    ``position``: the new token's position; ``q`` ``[n_q, D]`` (only when recording
    queries); ``selected`` bool ``[n_kv, pages]``; ``certificate`` and ``skipped_mass``
    ``[n_q]`` (the bound and the measured attention mass of the skipped pages; only when
    measuring); ``rounds``: times more pages were fetched.
    """

    position: int
    layer: int
    selected: np.ndarray
    q: np.ndarray | None = None
    certificate: np.ndarray | None = None
    skipped_mass: np.ndarray | None = None
    rounds: int = 0


@dataclass
class SparseState:
    """A sequence's sparse decoding: its policy, page index and (optionally) step log.

    ``record``: keep the queries in the log; ``measure``: compute each step's certificate
    and the attention mass actually skipped (exact scores over all keys: for tests and
    benchmarks, it costs a dense pass).
    """

    policy: SparsePolicy
    index: PageIndex
    record: bool = False
    measure: bool = False
    log: list[StepRecord] = field(default_factory=list)
    select_seconds: float = 0.0  # time spent choosing pages (bounds, ranking), all steps

    @classmethod
    def new(
        cls, policy: SparsePolicy, n_layers: int, record: bool = False, measure: bool = False
    ) -> SparseState:
        return cls(policy, PageIndex(n_layers, policy.page), record, measure)
