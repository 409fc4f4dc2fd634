"""``edge-infer cache``: inspect and tidy the agents' caches on disk."""

from __future__ import annotations

import typer

cache_app = typer.Typer(
    help="Inspect and tidy the agents' KV caches on disk.", no_args_is_help=True
)
