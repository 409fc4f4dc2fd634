"""Measures of how closely a backend's log-probabilities follow a reference's, and the text."""

from __future__ import annotations

from pydoc_data.topics import topics

import numpy as np


def corpus_text() -> str:
    """Real English text with code in it, the same on every machine (Python's own docs)."""
    return "\n\n".join(topics[k] for k in ("assert", "assignment", "async", "atom-identifiers"))


def agreement(ref: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || ours)) over positions of log-probabilities."""
    top1 = float(np.mean(ref.argmax(-1) == ours.argmax(-1)))
    kl = float(np.mean(np.sum(np.exp(ref) * (ref - ours.astype(np.float64)), axis=-1)))
    return top1, kl
