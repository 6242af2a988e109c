"""Images in requests: read from the wire, checked against the limits, decoded once with Pillow.

The dialects put an `ImageInput` (the image as the request carried it, and where: `messages[0].images[1]`)
into a message's content parts as `{"type": "image", "image": ImageInput}`, the shape Hugging Face
chat templates and processors take. `decode_request_images` turns each into a `PIL.Image` before
the model is leased, so a bad image is the client's 400 naming its place, never a 500, and costs
bounded memory: the encoded size is checked before decoding, the pixel count from the header
before the pixels are read.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from errors import InvalidRequest
from runners.base import GenerationRequest
from settings import Settings

# Formats decoded; anything else Pillow knows (TIFF, PSD, ICO, ...) is refused as unsupported.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


@dataclass(frozen=True)
class ImageInput:
    """An image as a request sent it: base64 text (Ollama), a data URL or an http(s) URL (OpenAI)."""

    source: str
    where: str  # the request's own path to it, for error messages and OpenAI's `param`
    kind: str = "base64"  # "base64" | "url"


def image_part(source: str, where: str, kind: str = "base64") -> dict[str, Any]:
    """A content part holding an undecoded image, as dialects build it."""
    return {"type": "image", "image": ImageInput(source, where, kind)}


def image_parts(messages: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Every image part of `messages`, in order."""
    return [
        part
        for m in messages or []
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part.get("type") == "image"
    ]


def has_images(request: GenerationRequest) -> bool:
    return bool(image_parts(request.messages))


def decode_request_images(request: GenerationRequest, settings: Settings) -> GenerationRequest:
    """The request with each `ImageInput` replaced by its decoded RGB `PIL.Image` (blocking: call
    it in a thread). Raises InvalidRequest naming the image for anything wrong with it."""
    parts = image_parts(request.messages)
    if not parts:
        return request
    if len(parts) > settings.max_images_per_request:
        raise InvalidRequest(
            f"{len(parts)} images in one request; at most {settings.max_images_per_request} "
            "are accepted (MAX_IMAGES_PER_REQUEST)",
            param="messages",
        )
    decoded = {id(part): _decode(part["image"], settings) for part in parts if isinstance(part["image"], ImageInput)}

    def swap(message: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(message.get("content"), list):
            return message
        content = [{**part, "image": decoded[id(part)]} if id(part) in decoded else part for part in message["content"]]
        return {**message, "content": content}

    return dataclasses.replace(request, messages=[swap(m) for m in request.messages or []])


def _decode(image: ImageInput, settings: Settings) -> Any:
    if image.kind == "url" and not image.source.startswith("data:"):
        data = _fetch(image, settings)
    else:
        data = _base64_bytes(image, settings.max_image_bytes)
    return open_image(data, image.where, settings.max_image_pixels)


def _base64_bytes(image: ImageInput, max_bytes: int) -> bytes:
    text = image.source
    if image.kind == "url":  # data:[<media type>][;base64],<data>
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InvalidRequest(
                f"{image.where}: a data URL must be base64 (data:image/png;base64,...)", param=image.where
            )
    if len(text) * 3 // 4 > max_bytes + 3:  # checked before decoding: base64 grows data by 4/3
        raise InvalidRequest(f"{image.where}: the image is over {max_bytes} bytes (MAX_IMAGE_BYTES)", param=image.where)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{image.where}: not valid base64 image data", param=image.where) from None


def open_image(data: bytes, where: str, max_pixels: int) -> Any:
    """Decode one image (PNG, JPEG, WebP, GIF or BMP; the first frame of an animation) to RGB."""
    from PIL import Image, UnidentifiedImageError

    def refuse(reason: str) -> InvalidRequest:
        return InvalidRequest(f"{where}: {reason}", param=where)

    try:
        # Pillow refuses images over twice its own MAX_IMAGE_PIXELS while opening (DecompressionBombError);
        # ours is checked next, from the header, before any pixel is decoded.
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise refuse(f"the image is {width}x{height} pixels, over the {max_pixels}-pixel limit (MAX_IMAGE_PIXELS)")
        image.load()
        return image.convert("RGB")
    except UnidentifiedImageError:
        known = _format_of(data)
        if known:
            raise refuse(f"unsupported image format {known} (use {', '.join(FORMATS)})") from None
        raise refuse(f"not an image (expected {', '.join(FORMATS)})") from None
    except Image.DecompressionBombError:
        raise refuse(
            f"the image has too many pixels (a decompression bomb?); the limit is {max_pixels} (MAX_IMAGE_PIXELS)"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data
        raise refuse(f"the image could not be decoded ({exc})") from None


def _format_of(data: bytes) -> str | None:
    """The format Pillow recognizes `data` as, among every format it knows (None: not an image)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except Exception:
        return None


def _fetch(image: ImageInput, settings: Settings) -> bytes:
    """Download an http(s) image, only under a prefix in IMAGE_URL_ALLOWLIST (no request forgery
    against internal services by default); no redirects, a timeout, and at most MAX_IMAGE_BYTES.
    A prefix matches at a `/` boundary: `https://cdn.example` does not admit `https://cdn.example.evil/`."""
    import httpx

    url = image.source
    if urlsplit(url).scheme not in ("http", "https"):
        raise InvalidRequest(f"{image.where}: image URLs must be data: URLs or http(s) URLs", param=image.where)
    if not any(url.startswith(prefix.rstrip("/") + "/") for prefix in settings.image_url_allowlist):
        raise InvalidRequest(
            f"{image.where}: this server does not fetch remote images (the URL is not in IMAGE_URL_ALLOWLIST); "
            "send the image inline as a data URL (data:image/png;base64,...)",
            param=image.where,
        )
    limit = settings.max_image_bytes
    try:
        with httpx.stream("GET", url, timeout=settings.image_fetch_timeout, follow_redirects=False) as response:
            if response.status_code != 200:
                raise InvalidRequest(
                    f"{image.where}: fetching the image answered HTTP {response.status_code}", param=image.where
                )
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > limit:
                    raise InvalidRequest(
                        f"{image.where}: the image is over {limit} bytes (MAX_IMAGE_BYTES)", param=image.where
                    )
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise InvalidRequest(f"{image.where}: the image could not be fetched ({exc})", param=image.where) from None
