"""Real text, real queries and decode runs of the default model for the sparse-attention tests."""

from __future__ import annotations

from pydoc_data.topics import topics

import numpy as np

from edge_infer.offload import SparsePolicy, SparseState


def real_ids(tokenizer, n: int) -> np.ndarray:
    """The first ``n`` token ids of real English text (CPython's documentation topics)."""
    text = "\n\n".join(topics[k] for k in sorted(topics)[:12])
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    assert len(ids) >= n, "not enough text"
    return ids[:n]


def decode(backend, cache, first: int, steps: int, forced: np.ndarray | None = None):
    """Feed ``first`` then ``steps - 1`` more tokens (greedy, or ``forced``): (the tokens fed,
    the logits after each) as numpy arrays."""
    fed, out, tok = [], [], first
    for i in range(steps):
        fed.append(tok)
        logits = backend.forward(np.array([tok]), cache)[-1].copy()
        out.append(logits)
        tok = int(forced[i]) if forced is not None and i < len(forced) else int(logits.argmax())
    return np.array(fed), np.array(out)


def recorded_queries(backend, cache, ids: np.ndarray, n_layers: int) -> list[np.ndarray]:
    """Per layer, the real queries [len(ids), n_q, D] of decode steps fed ``ids`` one by one
    after what ``cache`` holds (an all-pages sparse state records them, then is removed)."""
    cache.sparse = SparseState.new(SparsePolicy(budget=1.0, dense_layers=0), n_layers, record=True)
    for tok in ids:
        backend.forward(np.array([tok]), cache)
    log, cache.sparse = cache.sparse.log, None
    per_layer: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    for rec in log:
        assert rec.q is not None
        per_layer[rec.layer].append(rec.q)
    return [np.stack(x) for x in per_layer]
