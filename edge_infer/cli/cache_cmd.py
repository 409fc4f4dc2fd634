"""``edge-infer cache``: inspect and tidy the agents' caches on disk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edge_infer.cli.common import err, human_size, user_errors

cache_app = typer.Typer(
    help="Inspect and tidy the agents' KV caches on disk.", no_args_is_help=True
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
NameArg = Annotated[str, typer.Argument(help="The agent's name.")]
LOAD_HINT = (
    "Loading an agent sets its bad blocks aside (quarantine/) and recomputes the lost tokens; "
    "'edge-infer cache rm NAME' drops a cache, 'edge-infer cache gc' clears leftovers."
)


@contextmanager
def _errors() -> Iterator[None]:
    """One-line errors for our errors, bad values and file-system failures."""
    from edge_infer.cache_store.errors import CacheError

    with user_errors():
        try:
            yield
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise CacheError(f"{where}{e.strerror or e}") from None


def _root() -> Path:
    from edge_infer.config import cache_root

    return cache_root()


def _echo_json(doc: Any) -> None:
    typer.echo(json.dumps(doc, indent=2, ensure_ascii=False))


def _when(iso: str) -> str:
    """An ISO time stamp as local ``YYYY-MM-DD HH:MM`` (as is if it does not parse)."""
    try:
        return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso or "?"


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@cache_app.command("ls")
def ls(as_json: JsonOpt = False) -> None:
    """List every cached agent under every model."""
    with _errors():
        from edge_infer.cache_store.inventory import scan, total_bytes

        root = _root()
        records = scan(root)
        if as_json:
            _echo_json([r.summary_json() for r in records])
            return
        if records:
            Console().print(_ls_table(records))
        else:
            err.print("no cached agents")
        err.print(
            f"[dim]cache root: {escape(str(root))} · {_plural(len(records), 'agent')} · "
            f"{human_size(total_bytes(root))} on disk[/]",
            highlight=False,
        )


def _ls_table(records: list) -> Table:
    table = Table(title="Cached agents", title_justify="left")
    for col in ("agent", "model", "digest", "kv"):
        table.add_column(col, overflow="fold")
    for col in ("tokens", "cached", "msgs", "blocks", "size"):
        table.add_column(col, justify="right")
    table.add_column("updated")
    notes = any(r.problem for r in records)
    if notes:
        table.add_column("problem", style="red", overflow="fold")
    for r in records:
        counts = (r.tokens, r.cached_tokens, r.messages, len(r.blocks))
        row = [
            escape(r.agent),
            escape(r.model_name),
            r.digest[:8],
            r.kv_format,
            *(map(str, counts) if r.readable else ("",) * 4),
            human_size(r.bytes_on_disk),
            _when(r.updated) if r.readable else "",
        ]
        if notes:
            row.append(escape(r.problem or ""))
        table.add_row(*row)
    return table


@cache_app.command("show")
def show(name: NameArg, as_json: JsonOpt = False) -> None:
    """Everything about one agent's cache, under every model it was used with."""
    with _errors():
        from edge_infer.cache_store.inventory import describe

        records = describe(_root(), name)
        if as_json:
            _echo_json([r.detail_json() for r in records])
            return
        console = Console()
        for i, r in enumerate(records):
            if i:
                console.print()
            _show_record(console, r)


def _show_record(console: Console, r: Any) -> None:
    console.print(f"[bold]{escape(r.agent)}[/] · {escape(r.model_name)} · {r.digest}")
    facts = Table.grid(padding=(0, 2))
    facts.add_column(style="dim")
    facts.add_column(overflow="fold")
    rows = [
        ("model", r.model_name),
        ("source", r.model_source or "?"),
        ("path", str(r.path)),
        *((f"fingerprint.{k}", v) for k, v in sorted(r.fingerprint.items())),
        ("kv format", r.kv_format),
        ("created", _when(r.created) if r.created else "?"),
        ("updated", _when(r.updated) if r.updated else "?"),
        ("tokens", str(r.tokens)),
        ("cached tokens", str(r.cached_tokens)),
        ("messages", str(r.messages)),
        ("size on disk", human_size(r.bytes_on_disk)),
    ]
    for key, value in rows:
        facts.add_row(key, escape(value))
    if r.problem:
        facts.add_row("problem", f"[red]{escape(r.problem)}[/]")
    if r.quarantined:
        facts.add_row("quarantined", escape(", ".join(r.quarantined)))
    console.print(facts)
    if r.blocks:
        console.print(_blocks_table(r.blocks))
    if r.recent_messages:
        console.print(f"[dim]last {len(r.recent_messages)} of {r.messages} messages:[/]")
        for role, text in r.recent_messages:
            console.print(f"  [bold]{escape(role)}[/]: {escape(text)}", highlight=False)


def _blocks_table(blocks: list) -> Table:
    table = Table(title="Blocks", title_justify="left")
    table.add_column("file")
    for col in ("start", "length", "sealed", "bytes"):
        table.add_column(col, justify="right")
    for b in blocks:
        size = "[red]missing[/]" if b.bytes is None else human_size(b.bytes)
        table.add_row(b.file, str(b.start), str(b.length), "yes" if b.sealed else "no", size)
    return table


@cache_app.command("rm")
def rm(
    name: NameArg,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Only under this fingerprint digest (or prefix)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete an agent's cache (under every model, or one)."""
    with _errors():
        from edge_infer.cache_store.inventory import remove_agent

        removed = remove_agent(_root(), name, model)
        freed = sum(x.bytes for x in removed)
        if as_json:
            _echo_json({"removed": [x.to_json() for x in removed], "bytes_freed": freed})
            return
        for x in removed:
            typer.echo(f"removed {x.agent} ({x.model_name}, {x.digest}): {human_size(x.bytes)}")
        typer.echo(f"freed {human_size(freed)}")


@cache_app.command("verify")
def verify(
    name: Annotated[str | None, typer.Argument(help="Only this agent.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every cache file read-only; exit code 1 if any is unusable."""
    with _errors():
        from edge_infer.cache_store.inventory import verify as verify_all

        results = verify_all(_root(), name)
        bad = [r for r in results if not r.ok]
        if as_json:
            _echo_json([r.to_json() for r in results])
        else:
            _print_verify(results, bad)
    if bad:
        raise typer.Exit(1)


def _print_verify(results: list, bad: list) -> None:
    if not results:
        err.print("no cached agents")
        return
    table = Table(title="Cache check", title_justify="left")
    table.add_column("agent")
    table.add_column("digest")
    for col in ("tokens", "cached", "usable", "blocks"):
        table.add_column(col, justify="right")
    table.add_column("status")
    for r in results:
        status = "[green]OK[/]" if r.ok else f"[red]{_plural(len(r.problems), 'problem')}[/]"
        nums = (r.tokens, r.cached_tokens, r.usable_tokens, r.blocks)
        table.add_row(escape(r.agent), r.digest[:8], *map(str, nums), status)
    Console().print(table)
    for r in bad:
        for p in r.problems:
            typer.echo(f"{r.agent} [{r.digest[:8]}] {p.file}: {p.reason}")
    if bad:
        usable = ", ".join(f"{r.agent}: {r.usable_tokens}/{r.cached_tokens}" for r in bad)
        typer.echo(f"usable cached tokens: {usable}")
        err.print(f"[dim]{escape(LOAD_HINT)}[/]", highlight=False, soft_wrap=True)
    else:
        err.print(f"[dim]{_plural(len(results), 'agent')} OK[/]", highlight=False)


@cache_app.command("gc")
def gc(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "-n", help="Only say what would be removed.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Remove leftovers no agent needs: temp files, quarantine, unreferenced blocks."""
    with _errors():
        from edge_infer.cache_store.inventory import collect_garbage

        root = _root()
        report = collect_garbage(root, dry_run)
        if as_json:
            _echo_json(report.to_json())
            return
        verb = "would remove" if dry_run else "removed"
        for item in report.removed:
            typer.echo(f"{verb} {item.kind}: {_rel(item.path, root)} ({human_size(item.bytes)})")
        for path, reason in report.skipped:
            err.print(
                f"[yellow]kept {escape(_rel(path, root))}: {escape(reason)}[/]", soft_wrap=True
            )
        freed = human_size(report.bytes_freed)
        if not report.removed:
            typer.echo("nothing to remove")
        elif dry_run:
            typer.echo(f"would free {freed} (run without --dry-run to remove)")
        else:
            typer.echo(f"freed {freed}")
