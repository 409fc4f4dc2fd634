"""What models edge-infer can see, described without loading their weights."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_infer.config import models_dirs
from edge_infer.errors import EdgeInferError
from edge_infer.models.default_model import (
    DEFAULT_MODEL_NAME,
    assembled_path,
    default_model_path,
    installed_packaged_models,
)
from edge_infer.models.gguf.loader import checked_config
from edge_infer.models.gguf.reader import GGUFFile
from edge_infer.models.hf.loader import read_config


@dataclass(frozen=True)
class ModelInfo:
    """One model as listed by ``edge-infer models``."""

    name: str
    path: str
    format: str
    arch: str
    quantization: str
    size_bytes: int
    context_length: int
    default: bool = False
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def describe(path: Path, default: bool = False, title: str | None = None) -> ModelInfo:
    """Name, format, architecture, quantization and size of the model at ``path``."""
    try:
        if path.is_dir():
            cfg = read_config(path)
            q = cfg.get("quantization")
            return ModelInfo(
                name=str(cfg.get("_name_or_path") or path.name),
                path=str(path),
                format="safetensors",
                arch=str(cfg.get("model_type", "?")),
                quantization=f"{q['bits']}-bit g{q['group_size']}"
                if q
                else str(cfg.get("torch_dtype", "float")),
                size_bytes=_dir_size(path),
                context_length=int(cfg.get("max_position_embeddings", 0)),
                default=default,
            )
        gguf = GGUFFile(path)
        config = checked_config(gguf)
        types = Counter(
            gguf.tensor_type_name(n) for n, t in gguf.tensors.items() if len(t.shape) == 2
        )
        name = gguf.metadata.get("general.name")
        return ModelInfo(
            name=DEFAULT_MODEL_NAME if default else title or _one_line(name) or path.stem,
            path=str(path),
            format="gguf",
            arch=config.arch,
            quantization=types.most_common(1)[0][0] if types else "?",
            size_bytes=path.stat().st_size,
            context_length=config.context_length,
            default=default,
        )
    except (EdgeInferError, OSError, ValueError, TypeError, KeyError) as exc:
        # a model folder can hold anything: one bad file is listed with its problem
        return ModelInfo(
            name=path.name,
            path=str(path),
            format="?",
            arch="?",
            quantization="?",
            size_bytes=0,
            context_length=0,
            default=default,
            error=_one_line(exc) or type(exc).__name__,
        )


def _one_line(value: object, chars: int = 300) -> str:
    """``value`` as text on one line, at most ``chars`` characters ("" for None)."""
    text = " ".join(str(value).split()) if value is not None else ""
    return text if len(text) <= chars else text[: chars - 1] + "…"


def _is_candidate(p: Path) -> bool:
    try:
        return (p.is_file() and p.suffix.lower() == ".gguf") or (p / "config.json").is_file()
    except OSError:  # unreadable: listed, so that its problem shows
        return p.suffix.lower() == ".gguf"


def candidate_paths(folder: Path) -> list[Path]:
    """GGUF files and model directories directly inside ``folder`` (none if unreadable)."""
    try:
        return [p for p in sorted(folder.iterdir()) if _is_candidate(p)]
    except OSError:
        return []


def discover(extra: list[Path] | None = None) -> list[ModelInfo]:
    """The embedded default, the installed packaged models (by key until first use assembles
    them), models in the models folders, and any ``extra`` paths."""
    infos: list[ModelInfo] = []
    try:
        infos.append(describe(default_model_path(), default=True))
    except EdgeInferError:
        pass
    for packaged in installed_packaged_models():
        assembled = assembled_path(packaged)
        if assembled is not None:
            infos.append(describe(assembled, title=packaged.title))
            continue
        infos.append(  # listed by its key until first use assembles its file
            ModelInfo(
                name=packaged.title,
                path=packaged.key,
                format="gguf",
                arch=packaged.arch,
                quantization=packaged.quantization,
                size_bytes=packaged.size_bytes,
                context_length=packaged.context_length,
            )
        )
    paths: list[Path] = []
    for folder in models_dirs():
        paths += candidate_paths(folder)
    for p in extra or []:
        paths += candidate_paths(p) if p.is_dir() and not (p / "config.json").is_file() else [p]
    seen = {i.path for i in infos}
    for p in paths:
        if str(p) not in seen:
            seen.add(str(p))
            infos.append(describe(p))
    return infos
