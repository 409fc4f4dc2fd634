"""Images in requests: read from data: URIs or files in the folders the server allows, checked
to decode, and passed on as data: URIs (so an agent's stored conversation holds them)."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from edge_infer.server.structured import RequestError

REMOTE = ("http://", "https://")
# Pillow's format names to the media types a data: URI carries
MEDIA_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}

# (url or path, the request field it came from) -> the image as a data: URI
ResolveImage = Callable[[str, str], str]


def decode_data_uri(url: str, param: str) -> bytes:
    """The bytes a ``data:[type];base64,...`` URI holds."""
    head, comma, payload = url.partition(",")
    if not comma or not head.endswith(";base64"):
        raise RequestError(
            param, f"{param}: a data: URI must be base64 (data:image/png;base64,...)"
        )
    return decode_base64(payload, param)


def decode_base64(payload: str, param: str) -> bytes:
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(param, f"{param}: the image data is not valid base64") from None


def read_local(path: str, folders: Sequence[Path], param: str) -> bytes:
    """A file's bytes, only where it lies (symlinks resolved) inside one of ``folders``."""
    if not folders:
        raise RequestError(
            param,
            f"{param}: this server reads no local image files (start it with --image-folder "
            "DIR to allow a folder, or send the image as a data: URI)",
        )
    p = Path(path)
    if not p.is_absolute():
        raise RequestError(param, f"{param}: a local image path must be absolute (got {path!r})")
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError):
        raise RequestError(param, f"{param}: no such image file {path!r}") from None
    if not any(real.is_relative_to(f) for f in folders):
        raise RequestError(
            param, f"{param}: {path!r} is outside the folders this server reads images from"
        )
    try:
        return real.read_bytes()
    except OSError as exc:
        raise RequestError(param, f"{param}: cannot read {path!r} ({exc.strerror})") from None


def check_image(data: bytes, param: str) -> str:
    """The image's media type, once Pillow has decoded all of it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            fmt = img.format or ""
    except UnidentifiedImageError:
        raise RequestError(param, f"{param}: not an image (no format Pillow reads)") from None
    except Exception as exc:  # Pillow raises many kinds for a broken file or a bomb
        reason = str(exc) or type(exc).__name__
        raise RequestError(
            param, f"{param}: not an image this server can read ({reason})"
        ) from None
    return MEDIA_TYPES.get(fmt, f"image/{fmt.lower() or 'unknown'}")


def as_data_uri(data: bytes, param: str) -> str:
    media = check_image(data, param)
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


def image_resolver(folders: Sequence[Path], takes_images: bool) -> ResolveImage:
    """How a request's image URLs become data: URIs: data: URIs are checked, local paths
    (``file://`` or absolute) read from ``folders`` only, remote URLs refused; every error
    is a :class:`RequestError` naming the field."""
    roots = [f.resolve() for f in folders]

    def resolve(url: str, param: str) -> str:
        if not takes_images:
            raise RequestError(
                param,
                f"{param}: this model reads text only (serve a VLM directory, or a GGUF with "
                "--mmproj)",
            )
        if url.startswith("data:"):
            data = decode_data_uri(url, param)
        elif url.startswith(REMOTE):
            raise RequestError(
                param,
                f"{param}: remote image URLs are not fetched (this server reaches no network); "
                "send the image as a data: URI",
            )
        elif url.startswith("file://") or url.startswith("/"):
            data = read_local(url.removeprefix("file://"), roots, param)
        else:
            raise RequestError(
                param, f"{param}: an image URL must be a data: URI or an absolute local path"
            )
        return as_data_uri(data, param)

    return resolve
