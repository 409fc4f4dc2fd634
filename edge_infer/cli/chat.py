"""``edge-infer chat``: an interactive conversation with a persistent agent."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edge_infer.cli.chat_input import (
    CONTINUATION,
    PROMPT,
    Command,
    interpret,
    one_line,
    read_message,
)
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
    readable_image,
    state,
    user_errors,
)
from edge_infer.errors import EdgeInferError

HISTORY_SHOWN = 4  # messages shown when an agent with a conversation is opened


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[threading.Event]:
    """Ctrl-C sets the yielded event instead of raising KeyboardInterrupt inside model code."""
    pressed = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield pressed
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.set())
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _content(message: dict[str, Any]) -> str:
    """A message's text, an image shown as ``[image]`` (its data would fill the screen)."""
    content = message.get("content")
    if isinstance(content, list):
        return " ".join(
            "[image]" if p.get("type") in ("image_url", "image") else str(p.get("text", ""))
            for p in content
            if isinstance(p, dict)
        )
    return content if isinstance(content, str) else str(content or "")


def image_note(usage: Any) -> str:
    """The image tokens a prompt held of those its images had before dropping (or "")."""
    if not usage.image_tokens_total:
        return ""
    return f"image {usage.image_tokens}/{usage.image_tokens_total} tok kept"


class ChatSession:
    """The read-answer loop: one engine, the current agent and the sampling options."""

    def __init__(
        self,
        eng: Any,
        agent: Any,
        params: Any,
        *,
        interactive: bool,
        images: list[Path] | None = None,
    ) -> None:
        self.eng, self.agent, self.params = eng, agent, params
        self.interactive = interactive
        self.images: list[Path] = list(images or ())  # attached to the next message
        self.out = Console(highlight=False, markup=False, emoji=False)
        self.visited = [agent.name]
        self.running = True
        self.commands: dict[str, tuple[Callable[[str], None], str, str]] = {
            "help": (self.cmd_help, "", "list the commands"),
            "agents": (self.cmd_agents, "", "list agents: tokens cached, messages, size on disk"),
            "switch": (self.cmd_switch, "NAME", "switch to agent NAME (created if new)"),
            "fork": (self.cmd_fork, "NAME", "copy this agent into NAME and switch to the copy"),
            "reset": (self.cmd_reset, "", "forget the conversation (the system prompt stays)"),
            "system": (self.cmd_system, "[TEXT]", "show, or set, the system prompt"),
            "image": (self.cmd_image, "PATH", "attach an image to the next message"),
            "stats": (self.cmd_stats, "", "model, agent, cache and the last turn's numbers"),
            "save": (self.cmd_save, "", "write the caches to disk now"),
            "quit": (self.cmd_quit, "", "save and leave (also /exit or Ctrl-D)"),
            "exit": (self.cmd_quit, "", ""),
        }

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> None:
        """Read messages and commands until /quit or end of input, then save."""
        self.show_header()
        self.show_history()
        read: Callable[[str], str] = input if self.interactive else (lambda prompt: input())
        while self.running:
            try:
                entry = read_message(read, PROMPT, CONTINUATION)
            except EOFError:
                if self.interactive:
                    self.out.print()
                break
            except KeyboardInterrupt:
                self.out.print()
                continue
            if not entry.text.strip():
                continue
            with deferred_interrupts() as stop:
                try:
                    action = interpret(entry)
                    if isinstance(action, Command):
                        self.dispatch(action)
                    else:
                        self.ask(action, stop)
                except (EdgeInferError, ValueError, TypeError, OSError) as exc:
                    if state["debug"]:
                        raise
                    self.error(str(exc))
        self.finish()

    def ask(self, text: str, stop: threading.Event) -> None:
        """Stream the reply to ``text``; a Ctrl-C (``stop``) ends it, keeping what came."""
        pieces = self.agent.stream(text, self.params, images=self.images)
        tail, stopped, elapsed = "\n", False, 0.0
        try:
            with self.waiting():
                piece = next(pieces, None)
            self.images = []  # the turn has read them; a turn that failed keeps them
            start = time.perf_counter()
            while piece is not None:
                sys.stdout.write(piece)
                sys.stdout.flush()
                tail = piece
                if stop.is_set():
                    stopped = True
                    break
                piece = next(pieces, None)
            elapsed = time.perf_counter() - start
        finally:
            pieces.close()  # a stopped reply is kept, in the messages and in the cache
            if not tail.endswith("\n"):
                sys.stdout.write("\n")
                sys.stdout.flush()
        if stopped:
            self.out.print("[stopped]", style="yellow")
        self.show_usage(elapsed, stopped)

    def waiting(self) -> contextlib.AbstractContextManager[Any]:
        """A spinner until the first piece arrives (on a terminal only)."""
        if self.interactive and self.out.is_interactive:
            return self.out.status("thinking…", spinner="dots")
        return contextlib.nullcontext()

    def dispatch(self, command: Command) -> None:
        entry = self.commands.get(command.name)
        if entry is None:
            self.say(f"unknown command '/{command.name}' (type /help for the commands)", "yellow")
            return
        entry[0](command.arg)

    def finish(self) -> None:
        """Wait for the caches to reach the disk and say what was saved."""
        with deferred_interrupts():
            self.eng.flush()
            on_disk = {i.name: i for i in self.eng.agents() if i.bytes_on_disk}
        for name in self.visited:
            if name in on_disk:
                self.say(f"saved agent '{name}' ({_plural(on_disk[name].tokens, 'token')})", "dim")

    # -- output -------------------------------------------------------------------------------
    def say(self, text: str, style: str = "") -> None:
        self.out.print(Text(text, style=style), soft_wrap=True)

    def error(self, message: str) -> None:
        err.print(Text.assemble(("error:", "bold red"), " ", message), soft_wrap=True)

    def show_header(self) -> None:
        be = self.eng.backend
        self.out.print(
            Text.assemble(
                (self.eng.model.name, "bold"),
                f" · {be.name}/{be.device} · agent '{self.agent.name}'",
                (" · /help for commands", "dim"),
            ),
            soft_wrap=True,
        )

    def show_history(self) -> None:
        """The system prompt and the last few messages of the current agent, one line each."""
        agent = self.agent
        if agent.system:
            self.say(one_line(f"system: {agent.system}", self.out.width - 1), "dim")
        messages = [m for m in agent.messages if m.get("role") != "system"]
        if not messages:
            return
        self.say(f"({_plural(len(messages), 'earlier message')})", "dim")
        for m in messages[-HISTORY_SHOWN:]:
            label = f"{m.get('role', '?')}: "
            line = one_line(_content(m), self.out.width - len(label) - 1)
            self.out.print(Text.assemble((label, "bold"), line), soft_wrap=True)
        self.say(
            f"continuing agent '{agent.name}' ({_plural(agent.tokens, 'token')} cached)", "dim"
        )

    def show_usage(self, elapsed: float, stopped: bool) -> None:
        u = self.agent.usage
        speed = u.decode_tokens_per_s
        if not speed and u.completion_tokens > 1 and elapsed > 0:
            speed = (u.completion_tokens - 1) / elapsed  # a stopped turn has no figure of its own
        parts = [
            f"prompt {u.prompt_tokens} tok",
            f"reused {u.cached_tokens}",
            *([image_note(u)] if u.image_tokens_total else []),
            f"TTFT {u.ttft_s * 1000:.0f} ms",
            f"{speed:.1f} tok/s",
        ]
        if u.finish_reason == "length" and not stopped:
            parts.append("hit the length limit")
        self.say(" · ".join(parts), "dim")

    # -- commands -------------------------------------------------------------------------------
    def cmd_help(self, arg: str) -> None:
        table = Table(box=None, show_header=False, padding=(0, 2, 0, 0))
        for name, (_, args, text) in self.commands.items():
            if text:
                table.add_row(f"/{name} {args}".rstrip(), Text(text, style="dim"))
        self.out.print(table)
        self.say(
            'Multi-line input: end a line with \\ to continue it, or wrap the text in """. '
            "Ctrl-C stops an answer; //text sends a message that starts with /.",
            "dim",
        )

    def cmd_agents(self, arg: str) -> None:
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        offloading = self.eng.kv_memory is not None
        columns = ["", "agent", "tokens", "messages", "on disk"]
        if offloading:  # where an offloaded agent's KV is, and how often the pool served it
            columns += ["KV in pool", "KV on disk", "hit rate"]
        for col in columns:
            table.add_column(col, justify="left" if col in ("", "agent", "messages") else "right")
        for info in self.eng.agents():
            current = info.name == self.agent.name
            # agents not loaded in this process report no message count
            loaded = info.messages or info.bytes_in_memory or not info.bytes_on_disk
            table.add_row(
                "*" if current else "",
                Text(info.name, style="bold" if current else ""),
                str(info.tokens),
                str(info.messages) if loaded else "-",
                human_size(info.bytes_on_disk) if info.bytes_on_disk else "-",
                *(
                    [
                        human_size(info.kv_ram_bytes) if info.offloaded else "-",
                        human_size(info.kv_disk_bytes) if info.offloaded else "-",
                        f"{info.hit_rate:.0%}" if info.hit_rate is not None else "-",
                    ]
                    if offloading
                    else []
                ),
            )
        self.out.print(table)

    def cmd_switch(self, name: str) -> None:
        if not name:
            self.say("usage: /switch NAME", "yellow")
            return
        if name == self.agent.name:
            self.say(f"already on agent '{name}'", "dim")
            return
        existed = self.eng.has_agent(name)
        self.agent = self.eng.agent(name)
        self._visit(name)
        self.say(f"switched to agent '{name}'" + ("" if existed else " (new)"))
        self.show_history()

    def cmd_fork(self, name: str) -> None:
        if not name:
            self.say("usage: /fork NAME", "yellow")
            return
        source = self.agent.name
        self.agent = self.agent.fork(name)
        self._visit(name)
        self.say(
            f"forked '{source}' into '{name}' ({_plural(self.agent.tokens, 'token')} cached); "
            f"now on '{name}'"
        )

    def cmd_reset(self, arg: str) -> None:
        self.agent.reset()
        kept = " (system prompt kept)" if self.agent.system else ""
        self.say(f"forgot the conversation of agent '{self.agent.name}'{kept}")

    def cmd_system(self, text: str) -> None:
        if not text:
            if self.agent.system:
                self.say(f"system: {self.agent.system}")
            else:
                self.say("no system prompt (the model's default applies); set one: /system TEXT")
            return
        self.agent = self.eng.agent(self.agent.name, system=text)
        self.say("system prompt set; it applies from the next turn")

    def cmd_stats(self, arg: str) -> None:
        eng, agent, be = self.eng, self.agent, self.eng.backend
        kv_bits = be.kv_bits
        rows = [
            ("model", eng.model.name),
            ("backend", f"{be.name}/{be.device}" + (f", {kv_bits}-bit KV" if kv_bits else "")),
            ("context", f"{eng.context_length} tokens"),
            ("agent", agent.name),
            ("cached", _plural(agent.tokens, "token")),
            ("messages", str(len(agent.messages))),
        ]
        u = agent.usage
        if u.prompt_tokens:
            rows.append(
                (
                    "last turn",
                    f"prompt {u.prompt_tokens} tok · reused {u.cached_tokens} · "
                    + (f"{image_note(u)} · " if u.image_tokens_total else "")
                    + f"generated {u.completion_tokens} tok · TTFT {u.ttft_s * 1000:.0f} ms · "
                    f"prefill {u.prefill_tokens_per_s:.0f} tok/s · "
                    f"decode {u.decode_tokens_per_s:.1f} tok/s · {u.finish_reason or 'stopped'}",
                )
            )
        else:
            rows.append(("last turn", "none yet"))
        table = Table(box=None, show_header=False, padding=(0, 2, 0, 0))
        for key, value in rows:
            table.add_row(Text(key, style="dim"), value)
        self.out.print(table)

    def cmd_image(self, arg: str) -> None:
        if not arg:
            if self.images:
                self.say("attached to the next message: " + ", ".join(map(str, self.images)))
            else:
                self.say("usage: /image PATH (attaches the image to the next message)", "yellow")
            return
        if self.eng.vision is None:
            self.error(
                f"{self.eng.model.name} is a text-only model: it takes no images (chat with a "
                "VLM directory, or a GGUF with --mmproj)"
            )
            return
        try:
            path, (w, h) = readable_image(arg.strip().strip("'\""))
        except ValueError as exc:
            self.error(f"{exc} (nothing attached)")
            return
        self.images.append(path)
        n = len(self.images)
        self.say(
            f"attached {path.name} ({w}x{h}) to the next message"
            + (f" ({_plural(n, 'image')} now)" if n > 1 else "")
        )

    def cmd_save(self, arg: str) -> None:
        self.eng.flush()
        self.say(f"saved agent '{self.agent.name}' ({_plural(self.agent.tokens, 'token')})")

    def cmd_quit(self, arg: str) -> None:
        self.running = False

    def _visit(self, name: str) -> None:
        if name not in self.visited:
            self.visited.append(name)


def chat(
    model: ModelOpt = None,
    agent: Annotated[
        str, typer.Option("--agent", "-a", help="Agent to talk to (created if new).")
    ] = "default",
    backend: BackendOpt = "auto",
    kv_bits: Annotated[int, typer.Option(help="KV cache precision: 4, 8 or 16 (float16).")] = 4,
    kv_memory: KvMemoryOpt = None,
    system: Annotated[str | None, typer.Option(help="Set the agent's system prompt.")] = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 512,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.7,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    drop_oldest: Annotated[
        bool,
        typer.Option(help="When the conversation outgrows the context, drop the oldest turns."),
    ] = False,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", help="An image for the first message (repeatable; needs a VLM)."),
    ] = None,
    mmproj: MmprojOpt = None,
    visual_budget: VisualBudgetOpt = 0.2,
    visual_method: VisualMethodOpt = "hired",
) -> None:
    """Chat with an agent whose KV cache persists between runs."""
    with user_errors():
        from edge_infer.generation.sampling import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
        interactive = sys.stdin.isatty()
        if interactive:
            # Ctrl-C at the prompt gives a fresh prompt, even when started from a script or a
            # background job whose SIGINT is ignored (Python then installs no handler)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
        images = [readable_image(str(f))[0] for f in image or ()]
        eng = load_engine(
            model,
            backend,
            kv_bits,
            kv_memory,
            mmproj=mmproj,
            visual_method=visual_method,
            visual_budget=visual_budget,
        )
        if images and eng.vision is None:
            raise ValueError(
                f"{eng.model.name}: a text-only model takes no images (chat with a VLM "
                "directory, or a GGUF with --mmproj)"
            )
        overflow = "drop_oldest" if drop_oldest else None
        session = ChatSession(
            eng,
            eng.agent(agent, system=system, overflow=overflow),
            params,
            interactive=interactive,
            images=images,
        )
        session.run()
