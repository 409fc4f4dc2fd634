"""The CPU attention kernels (C++, built once per machine with torch's extension builder).

:func:`load` compiles ``kv_attention.cpp`` on first use (about half a minute; the result is
kept under :func:`kernel_dir`) and returns the module, or ``None`` when kernels are turned off
(``EDGE_INFER_KERNELS=off``) or cannot be built here; callers then use the plain-torch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path
from types import ModuleType

import platformdirs

SOURCE = Path(__file__).with_name("kv_attention.cpp")
# OpenMP as torch uses it: parallel regions run on torch's own thread pool (the library it
# ships has the same soname, so no second runtime is loaded)
_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_lock = threading.Lock()
_state: dict[str, ModuleType | None] = {}
log = logging.getLogger(__name__)


def kernel_dir() -> Path:
    """Where built kernels are kept (``EDGE_INFER_KERNEL_DIR`` overrides)."""
    override = os.environ.get("EDGE_INFER_KERNEL_DIR")
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("edge-infer")) / "kernels"


def enabled() -> bool:
    """False when ``EDGE_INFER_KERNELS`` is ``off`` (or ``0``/``false``)."""
    return os.environ.get("EDGE_INFER_KERNELS", "on").lower() not in ("off", "0", "false", "no")


def _cpu_features() -> str:
    """What ``-march=native`` depends on: a build is only reused on the same kind of CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _build_name() -> str:
    import torch

    digest = hashlib.sha256(SOURCE.read_bytes())
    for part in (" ".join(_FLAGS), torch.__version__, _cpu_features()):
        digest.update(part.encode())
    return "edge_infer_kv_attention_" + digest.hexdigest()[:12]


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module, building it on first use; ``None`` if unavailable."""
    if not enabled():
        return None
    with _lock:
        if "module" in _state:
            return _state["module"]
        _state["module"] = module = _build(verbose)
        return module


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH; the pip package's copy sits next to the
    interpreter, which is not on PATH when a virtualenv's python is run directly."""
    try:
        import ninja
    except ImportError:
        return
    folder = str(getattr(ninja, "BIN_DIR", ""))
    path = os.environ.get("PATH", "")
    if folder and folder not in path.split(os.pathsep):
        os.environ["PATH"] = folder + os.pathsep + path


def _build(verbose: bool) -> ModuleType | None:
    from torch.utils.cpp_extension import load as load_extension

    _ninja_on_path()

    name = _build_name()
    folder = kernel_dir() / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob("*.so")):
            print(
                "edge-infer: building the CPU attention kernel (once per machine, about 30 s)...",
                file=sys.stderr,
                flush=True,
            )
        return load_extension(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            verbose=verbose,
        )
    except Exception as exc:  # no compiler or headers, a read-only folder: plain torch works
        log.debug("CPU attention kernel unavailable: %s", exc)
        print(
            f"edge-infer: CPU attention kernel could not be built ({type(exc).__name__}); "
            "using the slower plain-torch path",
            file=sys.stderr,
        )
        return None
