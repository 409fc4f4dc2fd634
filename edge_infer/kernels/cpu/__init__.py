"""The CPU kernels (C++, built once per machine with torch's extension builder): attention
over stored KV caches and products with 4/8-bit packed weights.

:func:`load` compiles the sources into one module on first use (about a minute; the result is
kept under :func:`kernel_dir`) and returns it, or ``None`` when kernels are turned off
(``EDGE_INFER_KERNELS=off``) or cannot be built here; callers then use the plain-torch path.
``EDGE_INFER_KERNEL_ARCH`` picks the instruction set: ``native`` (default, this CPU's),
``avx2`` (x86-64-v3: AVX2, FMA, F16C, no AVX-512) or ``generic`` (no SIMD code paths).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import platformdirs

SOURCES = [
    Path(__file__).with_name(name)
    for name in ("module.cpp", "kv_attention.cpp", "quant_matmul.cpp", "rope.cpp", "norm.cpp")
]
# OpenMP as torch uses it: parallel regions run on torch's own thread pool (the library it
# ships has the same soname, so no second runtime is loaded)
_ARCH_FLAGS = {"native": ["-march=native"], "avx2": ["-march=x86-64-v3"], "generic": []}
# the step quant_linear fuses before its product
PREP_PLAIN, PREP_RMS_NORM, PREP_SWIGLU, PREP_GEGLU = 0, 1, 2, 3
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


def arch() -> str:
    """The instruction-set class kernels are built for (``EDGE_INFER_KERNEL_ARCH``)."""
    name = os.environ.get("EDGE_INFER_KERNEL_ARCH", "native").lower() or "native"
    if name not in _ARCH_FLAGS:
        raise ValueError(f"EDGE_INFER_KERNEL_ARCH={name!r} is not one of {', '.join(_ARCH_FLAGS)}")
    return name


def _flags() -> list[str]:
    return ["-O3", *_ARCH_FLAGS[arch()], "-fopenmp"]


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

    digest = hashlib.sha256()
    for source in [*SOURCES, *sorted(Path(__file__).parent.glob("*.h"))]:
        digest.update(source.read_bytes())
    for part in (" ".join(_flags()), torch.__version__, _cpu_features()):
        digest.update(part.encode())
    return f"edge_infer_cpu_{arch()}_{digest.hexdigest()[:12]}"


def build_folder() -> Path:
    """Where this build of the kernels (sources, flags, torch, CPU) is compiled and kept."""
    return kernel_dir() / _build_name()


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Held while this process loads or builds the kernels in ``folder``.

    torch's builder guards a build with a ``lock`` file that only the builder removes: a
    process killed mid-build (Ctrl-C on the first run) leaves it behind, and every later
    load then waits on it forever. This lock is the OS's (``flock``), released when its
    holder dies; whoever holds it knows no build is running, so a ``lock`` file left there
    is stale and goes.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): torch's own lock file only
        yield
        return
    with open(folder / "build.flock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                "edge-infer: waiting for another process building the CPU kernels...",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            (folder / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def copy_sources(folder: Path) -> list[Path]:
    """The sources and headers copied into ``folder/src`` (rewritten only when they differ):
    the builder records source paths, so compiling from a copy named by content keeps a second
    checkout or install of the same code from rebuilding the module. Returns the sources."""
    dest = folder / "src"
    dest.mkdir(exist_ok=True)
    for source in [*SOURCES, *sorted(Path(__file__).parent.glob("*.h"))]:
        data, copy = source.read_bytes(), dest / source.name
        if not copy.is_file() or copy.read_bytes() != data:
            tmp = copy.with_suffix(copy.suffix + ".tmp")
            tmp.write_bytes(data)
            tmp.replace(copy)
    return [dest / s.name for s in SOURCES]


def load(verbose: bool = False) -> ModuleType | None:
    """The compiled kernel module, building it on first use; ``None`` if unavailable."""
    if not enabled():
        return None
    key = arch()
    with _lock:
        if key in _state:
            return _state[key]
        _state[key] = module = _build(verbose)
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

    folder = build_folder()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob("*.so")):
            print(
                f"edge-infer: building the CPU kernels for {arch()} "
                "(once per machine, about a minute)...",
                file=sys.stderr,
                flush=True,
            )
        with build_lock(folder):
            return load_extension(
                name=folder.name,
                sources=[str(s) for s in copy_sources(folder)],
                extra_cflags=_flags(),
                extra_ldflags=["-fopenmp"],
                build_directory=str(folder),
                verbose=verbose,
            )
    except Exception as exc:  # no compiler or headers, a read-only folder: plain torch works
        log.debug("CPU kernels unavailable: %s", exc)
        print(
            f"edge-infer: CPU kernels could not be built ({type(exc).__name__}); "
            "using the slower plain-torch path",
            file=sys.stderr,
        )
        return None
