"""Images in: base64, data URI or allow-listed URL -> a checked RGB PIL image, long side capped."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import re
import threading
import warnings
from concurrent.futures import Executor
from typing import TYPE_CHECKING

import httpx
from PIL import Image, ImageOps

from serve_app.errors import InputTooLarge, InvalidInput, Overloaded, RerankError
from serve_app.scoring.types import Content
from serve_app.settings import Settings

if TYPE_CHECKING:  # annotations only: schemas is a module of this row
    from serve_app.schemas import ContentSpec, RerankJob

DATA_URI = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)


def without_addresses(message: str) -> str:
    """A decoder's message without the object reprs it carries ("<_io.BytesIO object at 0x7f...>"): a heap
    address tells a client nothing and an attacker something."""
    return re.sub(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>", "", message)


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
    # httpx resolves only literal dot segments: a percent-encoded one ("%2e%2e") or an encoded slash or backslash
    # reaches the image server, which may decode it and climb out of the allowed path.
    raw = target.raw_path.split(b"?", 1)[0].lower()
    if any(segment in (".", "..") for segment in target.path.split("/")) or b"%2f" in raw or b"%5c" in raw:
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


class RequestImages:
    """What one request's images may cost together: decoded pixels (`max_request_pixels`) and concurrent URL
    fetches (`image_url_concurrency`), so no request can monopolise the ingress' decoders or connections."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pixels = 0
        self.lock = threading.Lock()
        self.fetches = asyncio.Semaphore(settings.image_url_concurrency)

    def spend(self, pixels: int, field: str) -> None:
        with self.lock:
            self.pixels += pixels
            spent = self.pixels
        if spent > self.settings.max_request_pixels:
            raise InputTooLarge(
                f"{field}: the request's images hold {spent} pixels so far; the limit is "
                f"{self.settings.max_request_pixels} per request (setting max_request_pixels): send smaller "
                "images or fewer per request",
                field,
            )


async def fetch_url(url: str, settings: Settings, field: str, client: httpx.AsyncClient) -> bytes:
    if not url_allowed(url, settings.image_url_allowlist):
        raise InvalidInput(
            f"{field}: image URLs are accepted only from the allow-list (setting image_url_allowlist, "
            f"now {settings.image_url_allowlist or 'empty'}); send the image as base64 instead",
            field,
        )
    try:
        # The whole download within the timeout (httpx's own timeout is per read: a slow server could trickle).
        return await asyncio.wait_for(_download(url, settings, field, client), settings.image_url_timeout_s)
    except asyncio.TimeoutError:
        raise InvalidInput(
            f"{field}: fetching {url} took longer than {settings.image_url_timeout_s} s (setting image_url_timeout_s)",
            field,
        ) from None
    except httpx.PoolTimeout:
        # Our connections are all busy: not the caller's fault.
        raise Overloaded(
            "the ingress has no free connection to fetch images; retry after the Retry-After seconds",
            settings.retry_after_s,
        ) from None
    except httpx.HTTPError as exc:
        raise InvalidInput(f"{field}: cannot fetch {url}: {type(exc).__name__}", field) from exc


async def _download(url: str, settings: Settings, field: str, client: httpx.AsyncClient) -> bytes:
    # Ask for the bytes as stored and count them raw: a compressed body would be inflated past the cap.
    headers = {"Accept-Encoding": "identity"}
    # Waiting for a free connection gets half the time: past it the cause is our load, answered 503.
    timeout = httpx.Timeout(settings.image_url_timeout_s, pool=settings.image_url_timeout_s / 2)
    async with client.stream("GET", url, timeout=timeout, headers=headers) as response:
        if response.status_code != 200:
            raise InvalidInput(f"{field}: fetching {url} answered HTTP {response.status_code}", field)
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", ""):
            raise InvalidInput(
                f"{field}: {url} sent the image {encoding}-encoded; serve it uncompressed (images are compressed "
                "already)",
                field,
            )
        chunks, size = [], 0
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > settings.max_image_bytes:
                raise _too_many_bytes(field, settings)
            chunks.append(chunk)
        return b"".join(chunks)


def open_image(data: bytes, settings: Settings, field: str, budget: RequestImages | None = None) -> Image.Image:
    """Decode an allowed format, checking pixels, aspect ratio and the request's pixel budget from the header
    before the full decode; JPEGs decode at a reduced scale where that still covers max_image_size; EXIF
    orientation applied; RGB, long side at most max_image_size. Every decoder failure is InvalidInput."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=settings.image_formats)
            width, height = image.size
            if width * height > settings.max_image_pixels:
                raise InputTooLarge(
                    f"{field}: image has {width}x{height} = {width * height} pixels; the limit is "
                    f"{settings.max_image_pixels} (setting max_image_pixels)",
                    field,
                )
            if max(width, height) > settings.max_image_aspect_ratio * max(1, min(width, height)):
                raise InvalidInput(
                    f"{field}: image is {width}x{height}, longer than {settings.max_image_aspect_ratio}:1 "
                    "(setting max_image_aspect_ratio); crop or pad it",
                    field,
                )
            if budget is not None:
                budget.spend(width * height, field)
            if image.format == "JPEG":
                # Decode at 1/2, 1/4 or 1/8 scale where the result still exceeds the size we keep.
                image.draft("RGB", (settings.max_image_size, settings.max_image_size))
            image.load()
            image = ImageOps.exif_transpose(image)
            image = image.convert("RGB")
            image.thumbnail((settings.max_image_size, settings.max_image_size), Image.Resampling.BICUBIC)
    except (RerankError, MemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure (OSError, SyntaxError, struct.error ...)
        raise InvalidInput(
            f"{field}: not a readable image in an accepted format ({', '.join(settings.image_formats)}; setting "
            f"image_formats): {type(exc).__name__}: {without_addresses(str(exc))[:200]}",
            field,
        ) from exc
    return image


async def load_image(
    value: str,
    settings: Settings,
    field: str,
    client: httpx.AsyncClient,
    budget: RequestImages | None = None,
    threads: Executor | None = None,
) -> Image.Image:
    """One image from a request field; decoding runs on one of `threads` so the event loop keeps serving."""
    budget = budget or RequestImages(settings)
    if is_url(value):
        async with budget.fetches:
            data = await fetch_url(value, settings, field, client)
    else:
        data = decode_base64(value, settings, field)
    return await asyncio.get_running_loop().run_in_executor(threads, open_image, data, settings, field, budget)


def content_from(text: str | None, image: bytes | None, settings: Settings, field: str) -> Content:
    """A query or document from a record's fields (a bulk job's pair record, a label row): its image's bytes
    decoded and checked as a request's are (`open_image`). The bytes' own size was checked where they were read."""
    if image is None:
        return Content(text=text)
    return Content(text=text, image=open_image(image, settings, f"{field}.image"))


async def load_contents(
    job: RerankJob, settings: Settings, http: httpx.AsyncClient, threads: Executor | None = None
) -> tuple[list[Content], list[Content]]:
    """Each document's query and the documents as Content: every image fetched and decoded at once (on
    `threads`), within one budget for the request, a query shared by documents loaded once; each keeps its
    text."""
    fields = job.query_fields()
    if all(q.image is None for _, q in fields) and all(d.image is None for d in job.documents):
        loaded = {query: Content(text=query.text) for _, query in fields}
        return [loaded[job.query_of(i)] for i in range(len(job.documents))], [
            Content(text=d.text) for d in job.documents
        ]

    budget = RequestImages(settings)

    async def content(spec: ContentSpec, field: str) -> Content:
        if spec.image is None:
            return Content(text=spec.text)
        image = await load_image(spec.image, settings, f"{field}.image", http, budget, threads)
        return Content(text=spec.text, image=image)

    specs = [*((q, field) for field, q in fields), *((d, f"documents[{i}]") for i, d in enumerate(job.documents))]
    tasks = [asyncio.create_task(content(spec, field)) for spec, field in specs]
    try:
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:  # the deadline, or the client went away
        for task in tasks:
            task.cancel()
        raise
    # One image failed: its siblings' fetches and queued decodes stop too (a decode already running in a
    # thread finishes, bounded by the per-image limits).
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    failed = [task for task in tasks if not task.cancelled() and task.exception() is not None]
    if failed:
        raise failed[0].exception()
    contents = [task.result() for task in tasks]
    loaded = {query: content for (_, query), content in zip(fields, contents)}
    return [loaded[job.query_of(i)] for i in range(len(job.documents))], contents[len(fields) :]
