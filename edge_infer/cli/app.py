"""The ``edge-infer`` command."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edge_infer.config import BACKEND_CHOICES
from edge_infer.errors import EdgeInferError

app = typer.Typer(
    name="edge-infer",
    help="Local LLM runtime for small machines: 4-bit models, persistent per-agent KV caches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug or bool(os.environ.get("EDGE_INFER_DEBUG"))


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn our errors (and bad option values) into one red line and exit code 1."""
    try:
        yield
    except (EdgeInferError, ValueError, TypeError) as exc:
        if _state["debug"]:
            raise
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[dim]interrupted[/]")
        raise typer.Exit(130) from None


@contextmanager
def _loading(label: str) -> Iterator[Callable[[int, int], None]]:
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


def _load_engine(model: str | None, backend: str, kv_bits: int = 4) -> Any:
    from edge_infer.engine import Engine

    with _loading("loading model") as update:
        return Engine.load(model, backend=backend, kv_bits=kv_bits, progress=update)


ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model", "-m", help="A .gguf file or model directory (default: embedded SmolLM2-135M)."
    ),
]
BackendOpt = Annotated[
    str, typer.Option("--backend", "-b", help=f"One of {', '.join(BACKEND_CHOICES)}.")
]


@app.command()
def run(
    prompt: Annotated[
        str | None, typer.Argument(help="The prompt; '-' or nothing reads stdin.")
    ] = None,
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    top_k: Annotated[int, typer.Option(help="Keep the k most likely tokens (0 = off).")] = 40,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling threshold.")] = 0.95,
    min_p: Annotated[
        float, typer.Option(help="Drop tokens below min_p x the top probability.")
    ] = 0.05,
    repetition_penalty: Annotated[float, typer.Option(help="> 1 discourages repeats.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop at this string (repeatable).")
    ] = None,
    ignore_eos: Annotated[bool, typer.Option(help="Keep going past end-of-sequence.")] = False,
    system: Annotated[
        str | None, typer.Option(help="System message for the chat template.")
    ] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Plain completion: no chat template.")] = False,
    stats: Annotated[bool, typer.Option(help="Print token counts and speed to stderr.")] = True,
    kv_bits: Annotated[int, typer.Option(help="KV cache precision: 4, 8 or 16 (float16).")] = 4,
) -> None:
    """Answer one prompt, streaming the reply to stdout."""
    with _user_errors():
        if prompt is None or prompt == "-":
            if sys.stdin.isatty():
                raise ValueError("no prompt given (pass it as an argument or on stdin)")
            prompt = sys.stdin.read()
        from edge_infer.sampling import SamplingParams

        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=tuple(stop or ()),
            ignore_eos=ignore_eos,
        )
        eng = _load_engine(model, backend, kv_bits)
        if raw:
            pieces = eng.stream(prompt, params)
        else:
            messages = [{"role": "system", "content": system}] if system else []
            pieces = eng.stream_chat(messages + [{"role": "user", "content": prompt}], params)
        out = sys.stdout
        for piece in pieces:
            out.write(piece)
            out.flush()
        out.write("\n")
        if stats:
            u = eng.last_usage
            err.print(
                f"[dim]{eng.model.name} · {eng.backend.name}/{eng.backend.device} · "
                f"prompt {u.prompt_tokens} tok · generated {u.completion_tokens} tok · "
                f"TTFT {u.ttft_s * 1000:.0f} ms · {u.decode_tokens_per_s:.1f} tok/s · "
                f"{u.finish_reason}[/]",
                highlight=False,
            )


def _human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GB"


@app.command()
def models(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Extra files or folders to look at.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the models edge-infer can see: the embedded default and local files."""
    with _user_errors():
        from edge_infer.config import models_dirs
        from edge_infer.models.catalog import discover

        infos = discover(list(paths or []))
        if as_json:
            typer.echo(json.dumps([i.to_dict() for i in infos], indent=2))
            return
        table = Table(title="Models", title_justify="left")
        for col in ("name", "arch", "quant", "size", "context", "path"):
            table.add_column(col, overflow="fold")
        for i in infos:
            name = f"{i.name} [green](default)[/]" if i.default else i.name
            if i.error:
                table.add_row(
                    name, "[red]unreadable[/]", "", "", "", f"{i.path}\n[red]{i.error}[/]"
                )
            else:
                table.add_row(
                    name,
                    i.arch,
                    i.quantization,
                    _human_size(i.size_bytes),
                    str(i.context_length or "?"),
                    i.path,
                )
        Console().print(table)
        folders = ", ".join(str(p) for p in models_dirs())
        err.print(f"[dim]searched: {folders} (set EDGE_INFER_MODELS_DIR to change)[/]")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
