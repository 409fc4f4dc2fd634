"""The ``edge-infer`` command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edge_infer.cli.cache_cmd import cache_app
from edge_infer.cli.chat import chat
from edge_infer.cli.common import (
    BackendOpt,
    KvMemoryOpt,
    MmprojOpt,
    ModelOpt,
    VisualBudgetOpt,
    VisualMethodOpt,
    err,
    human_size,
    load_engine,
    state,
    user_errors,
)
from edge_infer.cli.serve import serve

app = typer.Typer(
    name="edge-infer",
    help="Local LLM runtime for small machines: 4-bit models, persistent per-agent KV caches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    state["debug"] = debug or bool(os.environ.get("EDGE_INFER_DEBUG"))


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
    kv_memory: KvMemoryOpt = None,
    json_schema: Annotated[
        Path | None,
        typer.Option(help="Answer with JSON valid against the schema in this file."),
    ] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", help="An image to ask about (repeatable; needs a VLM)."),
    ] = None,
    mmproj: MmprojOpt = None,
    visual_budget: VisualBudgetOpt = 0.2,
    visual_method: VisualMethodOpt = "hired",
) -> None:
    """Answer one prompt, streaming the reply to stdout."""
    with user_errors():
        if prompt is None or prompt == "-":
            if sys.stdin.isatty():
                raise ValueError("no prompt given (pass it as an argument or on stdin)")
            prompt = sys.stdin.read()
        from edge_infer.generation.constraint import Grammar
        from edge_infer.generation.sampling import SamplingParams

        grammar = None
        if json_schema is not None:
            try:
                text = json_schema.read_text()
            except OSError as exc:
                raise ValueError(
                    f"cannot read the JSON schema {json_schema}: {exc.strerror}"
                ) from None
            grammar = Grammar.json_schema(text)
            grammar.compiled()  # an unusable schema fails here, before the model loads
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
            grammar=grammar,
        )
        for f in image or ():
            if not f.is_file():
                raise ValueError(f"{f}: no such image file")
        if image and raw:
            raise ValueError("--image needs the chat template (drop --raw)")
        eng = load_engine(
            model,
            backend,
            kv_bits,
            kv_memory,
            mmproj=mmproj,
            visual_method=visual_method,
            visual_budget=visual_budget,
        )
        if raw:
            pieces = eng.stream(prompt, params)
        else:
            messages = [{"role": "system", "content": system}] if system else []
            content: str | list[dict] = prompt
            if image:
                content = [{"type": "image", "image": str(f)} for f in image]
                content.append({"type": "text", "text": prompt})
            pieces = eng.stream_chat(messages + [{"role": "user", "content": content}], params)
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
                + (
                    f"image {u.image_tokens}/{u.image_tokens_total} tok kept · "
                    if u.image_tokens_total
                    else ""
                )
                + f"TTFT {u.ttft_s * 1000:.0f} ms · {u.decode_tokens_per_s:.1f} tok/s · "
                f"{u.finish_reason}[/]",
                highlight=False,
            )


@app.command()
def models(
    paths: Annotated[
        list[Path] | None, typer.Argument(help="Extra files or folders to look at.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the models edge-infer can see: the embedded default and local files."""
    with user_errors():
        from edge_infer.config import models_dirs
        from edge_infer.models.catalog import discover

        infos = discover(list(paths or []))
        if as_json:
            typer.echo(json.dumps([i.to_dict() for i in infos], indent=2))
            return
        table = Table(title="Models", title_justify="left")
        for col in ("name", "arch", "quant", "size", "context", "path"):
            table.add_column(col, overflow="fold")
        for i in infos:  # names, paths and errors come from files: never markup
            name = escape(i.name) + (" [green](default)[/]" if i.default else "")
            if i.error:
                table.add_row(
                    name,
                    "[red]unreadable[/]",
                    "",
                    "",
                    "",
                    f"{escape(i.path)}\n[red]{escape(i.error)}[/]",
                )
            else:
                table.add_row(
                    name,
                    escape(i.arch),
                    escape(i.quantization),
                    human_size(i.size_bytes),
                    str(i.context_length or "?"),
                    escape(i.path),
                )
        Console().print(table)
        folders = ", ".join(str(p) for p in models_dirs())
        err.print(f"[dim]searched: {folders} (set EDGE_INFER_MODELS_DIR to change)[/]")


app.command()(chat)
app.command()(serve)
app.add_typer(cache_app, name="cache")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
