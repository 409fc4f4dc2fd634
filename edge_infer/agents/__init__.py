"""Agents: named, long-lived conversations whose KV caches persist between turns and runs."""
