"""Generating tokens: the runner (prefill, fits-check, logits), sequences, batches, sampling."""
