"""``edge-infer serve``: the local REST daemon."""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from edge_infer.cli.common import (
    BackendOpt,
    KvMemoryOpt,
    MmprojOpt,
    ModelOpt,
    VisualMethodOpt,
    err,
    load_engine,
    user_errors,
)
from edge_infer.errors import EdgeInferError
from edge_infer.server.guard import DEFAULT_MAX_BODY_BYTES, is_loopback

if TYPE_CHECKING:  # the engine (and torch) load when the server starts, not with the CLI
    from edge_infer.engine import Engine

DEFAULT_PORT = 8741
KEY_ENV = "EDGE_INFER_API_KEY"


def resolve_api_key(
    given: str | None, key_file: Path | None, env: Mapping[str, str]
) -> tuple[str | None, list[str]]:
    """The API key from ``--api-key``, ``--api-key-file`` or the environment, and warnings.

    A key on the command line is readable by every user of the machine (``ps``): it works,
    with a warning. A key file readable by others gets a warning too.
    """
    if given is not None and key_file is not None:
        raise ValueError("give the API key once: --api-key or --api-key-file, not both")
    warnings = []
    if key_file is not None:
        try:
            key = key_file.read_text(encoding="utf-8").strip()
            mode = key_file.stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise EdgeInferError(f"cannot read the API key file {key_file}: {reason}") from None
        if not key:
            raise EdgeInferError(f"the API key file {key_file} is empty")
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            warnings.append(
                f"the API key file {key_file} is readable by other users (chmod 600 it)"
            )
        return key, warnings
    if given is not None:
        warnings.append(
            "--api-key shows the key to every user of this machine (ps); prefer "
            f"{KEY_ENV} or --api-key-file"
        )
        key = given.strip()
    else:
        key = env.get(KEY_ENV, "").strip()
    if given is not None and not key:
        raise ValueError("--api-key is empty")
    return key or None, warnings


def check_image_folder(folder: Path) -> Path:
    """``folder`` resolved (symlinks too), if it is a directory."""
    real = folder.expanduser().resolve()
    if not real.is_dir():
        raise ValueError(f"--image-folder {folder}: no such directory")
    return real


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EdgeInferError(
                    f"port {port} on {host} is already in use (choose another with --port)"
                ) from None
            raise EdgeInferError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
    api_key: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer KEY' (needed to listen beyond this machine). "
            f"Visible in the process list: prefer {KEY_ENV} or --api-key-file.",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(help="Read the API key from this file (its first line)."),
    ] = None,
    max_body_mb: Annotated[
        float,
        typer.Option(help="Largest request body accepted, in MiB (larger ones get a 413)."),
    ] = DEFAULT_MAX_BODY_BYTES / 2**20,
    backend: BackendOpt = "auto",
    kv_bits: Annotated[int, typer.Option(help="KV cache precision: 4, 8 or 16 (float16).")] = 4,
    kv_memory: KvMemoryOpt = None,
    parallel: Annotated[
        int,
        typer.Option(help="Requests decoded together (one batched forward pass per token)."),
    ] = 8,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    mmproj: MmprojOpt = None,
    visual_budget: Annotated[
        float,
        typer.Option(
            help="Share of an image's tokens kept before the LLM (0-1); a request's "
            "visual_budget overrides it."
        ),
    ] = 0.2,
    visual_method: VisualMethodOpt = "hired",
    image_folder: Annotated[
        list[Path] | None,
        typer.Option(
            "--image-folder",
            help="Let requests name local image files inside this folder (repeatable); "
            "without it images come only as data: URIs.",
        ),
    ] = None,
) -> None:
    """Serve the model over HTTP: OpenAI-compatible API plus agent routes."""
    with user_errors():
        api_key, warnings = resolve_api_key(api_key, api_key_file, os.environ)
        for warning in warnings:
            err.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
        if not is_loopback(host) and not api_key:
            raise EdgeInferError(
                f"refusing to listen on {host} without an API key: anyone on the network could "
                f"use the model and read agents' conversations (set {KEY_ENV} or pass "
                "--api-key-file)"
            )
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535 (got {port})")
        if parallel < 1:
            raise ValueError(f"--parallel must be >= 1 (got {parallel})")
        max_body_bytes = int(max_body_mb * 2**20)
        if max_body_bytes < 1024:
            raise ValueError(f"--max-body-mb must allow at least 1 KiB (got {max_body_mb})")
        folders = [check_image_folder(f) for f in image_folder or ()]
        _check_port_free(host, port)
        import uvicorn

        from edge_infer.server.app import create_app

        shown = f"[{host}]" if ":" in host else host
        failed: list[BaseException] = []

        def load() -> Engine:
            eng = load_engine(
                model,
                backend,
                kv_bits,
                kv_memory,
                mmproj=mmproj,
                visual_method=visual_method,
                visual_budget=visual_budget,
            )
            err.print(
                f"edge-infer: {eng.model.name} on {eng.backend.name}/{eng.backend.device} at "
                f"http://{shown}:{port}/v1 (pid {os.getpid()}; Ctrl-C to stop)",
                highlight=False,
            )
            return eng

        def load_failed(exc: BaseException) -> None:
            failed.append(exc)
            server.should_exit = True

        # the port is bound first and the model loaded meanwhile: /health says "loading"
        app = create_app(
            load,
            api_key=api_key,
            max_active=parallel,
            max_body_bytes=max_body_bytes,
            on_load_error=load_failed,
            image_folders=folders,
        )
        config = uvicorn.Config(
            app,
            host=host.strip("[]"),
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=10,
        )
        server = uvicorn.Server(config)
        # uvicorn re-raises the stop signal after its graceful shutdown; land it in a no-op so
        # a stop by SIGTERM or Ctrl-C ends with exit code 0 once the caches are saved
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        server.run()
        if failed:
            raise failed[0]
        err.print("edge-infer: stopped; agents' caches are saved", highlight=False)
