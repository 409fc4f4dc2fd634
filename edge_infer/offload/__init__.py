"""Tiered KV for long contexts: page abstracts, attention bounds, page selection, RAM/disk tiers."""

from edge_infer.offload.bounds import group_max, quest_bounds, scores, true_max_scores
from edge_infer.offload.index import PageIndex, SparseState, StepRecord
from edge_infer.offload.pages import block_page_bounds, page_bounds, page_count
from edge_infer.offload.selection import (
    SELECTIONS,
    SparsePolicy,
    always_pages,
    certificate,
    grow_selection,
    next_pages,
    oracle_pages,
    page_mass,
    query_ranking,
    select_certified,
    select_pages,
    spans_of,
    window_pages,
)
from edge_infer.offload.tiers import HostPool, SequenceTiers, TierCounters

__all__ = [
    "SELECTIONS",
    "HostPool",
    "SequenceTiers",
    "TierCounters",
    "PageIndex",
    "SparseState",
    "StepRecord",
    "SparsePolicy",
    "always_pages",
    "block_page_bounds",
    "certificate",
    "group_max",
    "page_bounds",
    "page_count",
    "quest_bounds",
    "scores",
    "grow_selection",
    "next_pages",
    "oracle_pages",
    "page_mass",
    "query_ranking",
    "select_certified",
    "select_pages",
    "spans_of",
    "true_max_scores",
    "window_pages",
]
