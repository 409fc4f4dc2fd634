"""Per-sequence sparse decoding state: page boxes of the sealed tokens and the step log."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_infer.offload.pages import page_bounds
from edge_infer.offload.selection import SparsePolicy


class PageIndex:
    """Per layer, page boxes (float16 ``[n_kv, pages, D]`` min and max) of the keys of the
    first ``tokens(layer)`` sealed tokens, as attention reads them; grown as blocks seal."""

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
        lo, hi = page_bounds(keys, self.page)
        old_lo, old_hi = self._lo[layer], self._hi[layer]
        if old_lo is not None and old_hi is not None:
            lo, hi = np.concatenate([old_lo, lo], axis=1), np.concatenate([old_hi, hi], axis=1)
        self._lo[layer], self._hi[layer] = lo, hi

    def bounds(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) float16 ``[n_kv, pages, D]`` of the layer (ValueError when empty)."""
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

    @property
    def nbytes(self) -> int:
        return sum(int(x.nbytes) for x in (*self._lo, *self._hi) if x is not None)


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

    @classmethod
    def new(
        cls, policy: SparsePolicy, n_layers: int, record: bool = False, measure: bool = False
    ) -> SparseState:
        return cls(policy, PageIndex(n_layers, policy.page), record, measure)
