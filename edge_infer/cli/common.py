"""What every ``edge-infer`` command shares: error reporting, progress, model loading."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from edge_infer.config import BACKEND_CHOICES
from edge_infer.errors import EdgeInferError

err = Console(stderr=True)
state = {"debug": False}


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn our errors (and bad option values) into one red line and exit code 1."""
    try:
        yield
    except (EdgeInferError, ValueError, TypeError) as exc:
        if state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[dim]interrupted[/]")
        raise typer.Exit(130) from None


@contextmanager
def loading(label: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr while weights load (silent when stderr is not a terminal)."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    with progress:
        task = progress.add_task(label, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


def load_engine(
    model: str | None,
    backend: str,
    kv_bits: int = 4,
    kv_memory: str | None = None,
    **vision: Any,
) -> Any:
    """The engine for ``model``; ``vision``: Engine.load's mmproj and visual settings."""
    from edge_infer.engine import Engine

    with loading("loading model") as update:
        return Engine.load(
            model,
            backend=backend,
            kv_bits=kv_bits,
            kv_memory=kv_memory,
            progress=update,
            **vision,
        )


def readable_image(path: str) -> tuple[Path, tuple[int, int]]:
    """``path`` (``~`` expanded) and its size, once the image has decoded."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{path}: no such image file")
    try:
        with Image.open(p) as img:
            img.load()
            return p, img.size
    except UnidentifiedImageError:
        raise ValueError(f"{path}: not an image (no format Pillow reads)") from None
    except Exception as exc:  # Pillow raises many kinds for a broken file
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ValueError(f"{path}: not an image that can be read ({reason})") from None


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="A .gguf file or model directory (default: embedded SmolLM2-135M)."
    ),
]
BackendOpt = Annotated[
    str, typer.Option("--backend", "-b", help=f"One of {', '.join(BACKEND_CHOICES)}.")
]
MmprojOpt = Annotated[
    Path | None, typer.Option(help="llama.cpp mmproj file: the image side of a text GGUF.")
]
VisualBudgetOpt = Annotated[
    float, typer.Option(help="Share of an image's tokens kept before the LLM (0-1).")
]
VisualMethodOpt = Annotated[
    str, typer.Option(help="Image-token dropping: hired, full, uniform or cls-topk.")
]
KvMemoryOpt = Annotated[
    str | None,
    typer.Option(
        help="Host-memory budget for agents' KV (e.g. 256MB): an agent that would need more "
        "is offloaded to that pool and disk, and decodes reading only the pages that matter "
        "(torch backend; EDGE_INFER_KV_MEMORY).",
    ),
]


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"
