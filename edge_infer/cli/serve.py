"""``edge-infer serve``: the local REST daemon."""

from __future__ import annotations

import errno
import ipaddress
import os
import signal
import socket
from typing import Annotated

import typer

from edge_infer.cli.common import BackendOpt, ModelOpt, err, load_engine, user_errors
from edge_infer.errors import EdgeInferError

DEFAULT_PORT = 8741


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
            envvar="EDGE_INFER_API_KEY",
            help="Require 'Authorization: Bearer KEY' (needed to listen beyond this machine).",
        ),
    ] = None,
    backend: BackendOpt = "auto",
    kv_bits: Annotated[int, typer.Option(help="KV cache precision: 4, 8 or 16 (float16).")] = 4,
    parallel: Annotated[
        int,
        typer.Option(help="Requests decoded together (one batched forward pass per token)."),
    ] = 8,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the model over HTTP: OpenAI-compatible API plus agent routes."""
    with user_errors():
        if not is_loopback(host) and not api_key:
            raise EdgeInferError(
                f"refusing to listen on {host} without an API key: anyone on the network could "
                "use the model and read agents' conversations (pass --api-key or set "
                "EDGE_INFER_API_KEY)"
            )
        if not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535 (got {port})")
        if parallel < 1:
            raise ValueError(f"--parallel must be >= 1 (got {parallel})")
        _check_port_free(host, port)
        import uvicorn

        from edge_infer.server.app import create_app

        eng = load_engine(model, backend, kv_bits)
        app = create_app(eng, api_key=api_key, max_active=parallel)
        shown = f"[{host}]" if ":" in host else host
        err.print(
            f"edge-infer: {eng.model.name} on {eng.backend.name}/{eng.backend.device} at "
            f"http://{shown}:{port}/v1 (pid {os.getpid()}; Ctrl-C to stop)",
            highlight=False,
        )
        config = uvicorn.Config(
            app,
            host=host.strip("[]"),
            port=port,
            log_level=log_level,
            timeout_graceful_shutdown=10,
        )
        # uvicorn re-raises the stop signal after its graceful shutdown; land it in a no-op so
        # a stop by SIGTERM or Ctrl-C ends with exit code 0 once the caches are saved
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: None)
        uvicorn.Server(config).run()
        err.print("edge-infer: stopped; agents' caches are saved", highlight=False)
