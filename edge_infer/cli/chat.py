"""``edge-infer chat``: an interactive conversation with a persistent agent."""

from __future__ import annotations

import typer


def chat() -> None:
    """Chat with an agent whose KV cache persists between runs."""
    raise typer.Exit(1)
