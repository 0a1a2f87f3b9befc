"""Images in: base64, data URI or allow-listed URL -> a checked RGB PIL image, long side capped."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import warnings

import httpx
from PIL import Image, UnidentifiedImageError

from serve_app.errors import InputTooLarge, InvalidInput
from serve_app.settings import Settings

DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def is_url(value: str) -> bool:
    return value.startswith(("http://", "https://"))


def url_allowed(url: str, allowlist: list[str]) -> bool:
    """Same scheme and host:port as an allow-list entry, and a path inside its path.

    Paths are compared as httpx will send them (dot segments resolved), segment by segment, so
    `/images/../secret` and `/images-private/` do not pass for an entry `/images/`.
    """
    try:
        target = httpx.URL(url)
    except httpx.InvalidURL:
        return False
    for entry in allowlist:
        allowed = httpx.URL(entry)
        prefix = allowed.path.rstrip("/")
        if (
            target.scheme == allowed.scheme
            and target.host == allowed.host
            and target.port == allowed.port
            and not target.userinfo
            and (target.path == prefix or target.path.startswith(prefix + "/"))
        ):
            return True
    return False


def _too_many_bytes(field: str, settings: Settings) -> InputTooLarge:
    return InputTooLarge(
        f"{field}: image is larger than {settings.max_image_bytes} bytes (setting max_image_bytes)", field
    )


def decode_base64(value: str, settings: Settings, field: str) -> bytes:
    payload = DATA_URI.sub("", value, count=1)
    # base64 holds 3 bytes per 4 characters: reject before decoding what cannot fit.
    if len(payload) * 3 // 4 > settings.max_image_bytes:
        raise _too_many_bytes(field, settings)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidInput(
            f"{field}: not valid base64 ({exc}); send the image as base64, a data:image/...;base64, URI "
            "or an allow-listed http(s) URL",
            field,
        ) from exc


async def fetch_url(url: str, settings: Settings, field: str, client: httpx.AsyncClient) -> bytes:
    if not url_allowed(url, settings.image_url_allowlist):
        raise InvalidInput(
            f"{field}: image URLs are accepted only from the allow-list (setting image_url_allowlist, "
            f"now {settings.image_url_allowlist or 'empty'}); send the image as base64 instead",
            field,
        )
    try:
        async with client.stream("GET", url, timeout=settings.image_url_timeout_s) as response:
            if response.status_code != 200:
                raise InvalidInput(f"{field}: fetching {url} answered HTTP {response.status_code}", field)
            chunks, size = [], 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > settings.max_image_bytes:
                    raise _too_many_bytes(field, settings)
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as exc:
        raise InvalidInput(f"{field}: cannot fetch {url}: {type(exc).__name__}", field) from exc


def open_image(data: bytes, settings: Settings, field: str) -> Image.Image:
    """Decode, check pixels before the full decode, convert to RGB and shrink to max_image_size."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise InputTooLarge(
                    f"{field}: image has {width}x{height} = {width * height} pixels; the limit is "
                    f"{settings.max_image_pixels} (setting max_image_pixels)",
                    field,
                )
            image.load()
    except (
        UnidentifiedImageError,
        OSError,
        Image.DecompressionBombWarning,
        Image.DecompressionBombError,
    ) as exc:
        raise InvalidInput(f"{field}: not a readable image ({type(exc).__name__}: {exc})", field) from exc
    image = image.convert("RGB")
    image.thumbnail((settings.max_image_size, settings.max_image_size), Image.Resampling.BICUBIC)
    return image


async def load_image(value: str, settings: Settings, field: str, client: httpx.AsyncClient) -> Image.Image:
    """One image from a request field; decoding runs in a thread so the event loop keeps serving."""
    data = await fetch_url(value, settings, field, client) if is_url(value) else decode_base64(value, settings, field)
    return await asyncio.to_thread(open_image, data, settings, field)
