"""Image input: base64, data URI and allow-listed URLs -> checked RGB images, with every limit enforced."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from serve_app.errors import InputTooLarge, InvalidInput, Overloaded
from serve_app.media import RequestImages, load_image, open_image, url_allowed
from serve_app.settings import Settings

FIELD = "documents[0].image"


def png_bytes(size: tuple[int, int], mode: str = "RGB", color=None) -> bytes:
    image = Image.new(mode, size, color if color is not None else (10, 120, 230) if mode == "RGB" else 128)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def load(value: str, settings: Settings | None = None) -> Image.Image:
    async def go() -> Image.Image:
        async with httpx.AsyncClient(trust_env=False) as client:
            return await load_image(value, settings or Settings(), FIELD, client)

    return asyncio.run(go())


def test_base64_decodes_to_rgb():
    image = load(b64(png_bytes((20, 10))))
    assert image.mode == "RGB"
    assert image.size == (20, 10)
    assert image.getpixel((0, 0)) == (10, 120, 230)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_convert_to_rgb(mode):
    assert load(b64(png_bytes((8, 8), mode=mode, color=0))).mode == "RGB"


def test_data_uri_decodes_to_rgb():
    image = load("data:image/png;base64," + b64(png_bytes((12, 7))))
    assert image.mode == "RGB"
    assert image.size == (12, 7)


def test_long_side_is_resized_to_max_image_size():
    image = load(b64(png_bytes((400, 100))), Settings(max_image_size=64))
    assert image.size == (64, 16)
    tall = load(b64(png_bytes((50, 200))), Settings(max_image_size=100))
    assert tall.size == (25, 100)


def test_small_image_is_not_enlarged():
    assert load(b64(png_bytes((30, 20))), Settings(max_image_size=64)).size == (30, 20)


def test_invalid_base64_is_invalid_input_naming_the_field():
    with pytest.raises(InvalidInput, match="base64") as info:
        load("this is not base64!!")
    assert info.value.field == FIELD
    assert FIELD in info.value.message


def test_not_an_image_is_invalid_input():
    with pytest.raises(InvalidInput, match="not a readable image") as info:
        load(b64(b"plain text, not an image at all"))
    assert info.value.field == FIELD
    # PIL's message names the buffer by its heap address ("<_io.BytesIO object at 0x7f...>"): left out.
    assert "0x" not in info.value.message and "BytesIO" not in info.value.message


def test_over_max_image_bytes_is_input_too_large():
    data = png_bytes((64, 64))
    with pytest.raises(InputTooLarge, match="max_image_bytes") as info:
        load(b64(data), Settings(max_image_bytes=len(data) // 2))
    assert info.value.field == FIELD


def test_over_max_image_pixels_is_input_too_large():
    with pytest.raises(InputTooLarge, match="max_image_pixels") as info:
        load(b64(png_bytes((20, 11))), Settings(max_image_pixels=200))
    assert info.value.field == FIELD
    assert load(b64(png_bytes((20, 10))), Settings(max_image_pixels=200)).size == (20, 10)


def test_url_not_on_allow_list_is_invalid_input():
    with pytest.raises(InvalidInput, match="image_url_allowlist") as info:
        load("https://img.example.com/cat.png")
    assert info.value.field == FIELD
    with pytest.raises(InvalidInput, match="image_url_allowlist"):
        load("https://other.example.com/cat.png", Settings(image_url_allowlist=["https://img.example.com/"]))


ALLOWLIST = ["https://img.example.com/", "https://cdn.example.org/images/"]


@pytest.mark.parametrize(
    "url",
    [
        "https://img.example.com/cat.png",
        "https://IMG.example.com/a/b/c.jpg",
        "https://cdn.example.org/images/cat.png",
        "https://cdn.example.org/images/sub/dir/cat.png?size=2",
    ],
)
def test_url_allowed_accepts_urls_under_an_entry(url):
    assert url_allowed(url, ALLOWLIST)


@pytest.mark.parametrize(
    "url",
    [
        "https://img.example.com.evil.net/cat.png",
        "https://evil.net/img.example.com/cat.png",
        "https://img.example.com@evil.net/cat.png",
        "https://evilimg.example.com/cat.png",
        "http://img.example.com/cat.png",
        "https://img.example.com:8443/cat.png",
        "https://cdn.example.org/private/cat.png",
        "https://cdn.example.org/cat.png",
    ],
)
def test_url_allowed_rejects_look_alike_hosts_and_other_paths(url):
    assert not url_allowed(url, ALLOWLIST)


@pytest.mark.parametrize(
    "path",
    [
        "/images/../private/cat.png",
        "/images/%2e%2e/private/cat.png",  # httpx leaves encoded dot segments as they are; the server may not
        "/images/%2E%2e/private/cat.png",
        "/images/.%2e/private/cat.png",
        "/images/sub/%2e%2e/%2e%2e/private/cat.png",
        "/images/..%2fprivate/cat.png",  # an encoded slash
        "/images/..%5cprivate/cat.png",  # an encoded backslash
    ],
)
def test_url_allowed_rejects_dot_segments_leaving_the_allowed_path(path):
    assert not url_allowed(f"https://cdn.example.org{path}", ALLOWLIST)


def test_url_allowed_entry_path_ends_at_a_segment_boundary():
    assert not url_allowed("https://cdn.example.org/images-private/cat.png", ["https://cdn.example.org/images"])


def test_url_allowed_with_empty_allow_list_rejects_everything():
    assert not url_allowed("https://img.example.com/cat.png", [])


def test_allow_list_setting_splits_comma_separated_string():
    settings = Settings(image_url_allowlist="https://a.example.com/, https://b.example.com/x/")
    assert settings.image_url_allowlist == ["https://a.example.com/", "https://b.example.com/x/"]


IMAGE_PNG = png_bytes((300, 150))


class ImageHandler(BaseHTTPRequestHandler):
    in_flight = 0
    most_in_flight = 0
    finished = 0
    lock = threading.Lock()

    def do_GET(self):  # noqa: N802 - http.server's name
        if not self.path.startswith("/images/slow-"):  # /images/slower-* is not counted
            self.answer()
            return
        cls = type(self)  # count the slow fetches in flight at once
        with cls.lock:
            cls.in_flight += 1
            cls.most_in_flight = max(cls.most_in_flight, cls.in_flight)
        try:
            self.answer()
        finally:
            with cls.lock:
                cls.in_flight -= 1

    def answer(self) -> None:
        if self.path.startswith("/images/slow"):  # answers after a second (slower-*: after five)
            time.sleep(5.0 if self.path.startswith("/images/slower") else 1.0)
            self.send_png(IMAGE_PNG)
            type(self).finished += 1
        elif self.path == "/images/trickle.png":  # a byte at a time, never stalling one read for long
            self.send_response(200)
            self.send_header("Content-Length", str(len(IMAGE_PNG)))
            self.end_headers()
            for byte in IMAGE_PNG[:40]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
        elif self.path == "/images/gzip.png":
            body = gzip.compress(IMAGE_PNG)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/images/photo.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(IMAGE_PNG)))
            self.end_headers()
            self.wfile.write(IMAGE_PNG)
        else:
            self.send_error(404)

    def send_png(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_allow_listed_url_is_fetched_and_decoded(image_server):
    settings = Settings(image_url_allowlist=[f"{image_server}/images/"], max_image_size=100)
    image = load(f"{image_server}/images/photo.png", settings)
    assert image.mode == "RGB"
    assert image.size == (100, 50)


def test_allow_listed_url_answering_404_is_invalid_input(image_server):
    settings = Settings(image_url_allowlist=[f"{image_server}/images/"])
    with pytest.raises(InvalidInput, match="404"):
        load(f"{image_server}/images/missing.png", settings)


def test_allow_listed_url_over_max_image_bytes_is_input_too_large(image_server):
    settings = Settings(image_url_allowlist=[f"{image_server}/images/"], max_image_bytes=len(IMAGE_PNG) - 1)
    with pytest.raises(InputTooLarge, match="max_image_bytes"):
        load(f"{image_server}/images/photo.png", settings)


# --- hostile images and hostile servers -------------------------------------------------------------------


def image_bytes(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["TIFF", "ICO", "PPM"])
def test_a_format_outside_the_allowed_list_is_refused_undecoded(fmt):
    with pytest.raises(InvalidInput, match="image_formats") as info:
        load(b64(image_bytes(Image.new("RGB", (16, 16)), fmt)))
    assert info.value.field == FIELD
    allowed = Settings(image_formats=f"PNG,{fmt}")  # the operator's choice
    assert load(b64(image_bytes(Image.new("RGB", (16, 16)), fmt)), allowed).size == (16, 16)


def test_an_unknown_format_setting_is_refused_at_start():
    with pytest.raises(ValueError, match="image_formats"):
        Settings(image_formats="PNG,NOSUCH")


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    stored = image_bytes(Image.new("RGB", (40, 20), (200, 10, 10)), "JPEG", exif=exif.tobytes())
    assert load(b64(stored)).size == (20, 40)


def test_a_decoder_failure_after_opening_is_invalid_input(monkeypatch):
    def refuse(self, mode=None, *args, **kwargs):
        raise ValueError(f"conversion from {self.mode} to {mode} not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)
    with pytest.raises(InvalidInput, match="conversion"):
        load(b64(png_bytes((8, 8))))


@pytest.mark.parametrize("size", [(384, 1), (1, 300), (2100, 100)])
def test_an_extreme_aspect_ratio_is_refused(size):
    with pytest.raises(InvalidInput, match="max_image_aspect_ratio"):
        load(b64(png_bytes(size, mode="L")))
    assert load(b64(png_bytes((400, 20), mode="L"))).size == (384, 19)  # 20:1 passes


def test_a_requests_images_share_one_pixel_budget():
    settings = Settings(max_request_pixels=3 * 100 * 100)
    budget = RequestImages(settings)
    image = png_bytes((100, 100))
    for _ in range(3):
        open_image(image, settings, FIELD, budget)
    with pytest.raises(InputTooLarge, match="max_request_pixels"):
        open_image(image, settings, "documents[3].image", budget)


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(monkeypatch):
    big = image_bytes(Image.new("RGB", (4000, 3000), (30, 60, 90)), "JPEG")
    decoded = []
    load_jpeg = Image.Image.load

    def spy(self):
        decoded.append(self.size)  # the size the decoder produces, after draft()
        return load_jpeg(self)

    monkeypatch.setattr(Image.Image, "load", spy)
    assert load(b64(big)).size == (384, 288)
    assert decoded and decoded[0] == (1000, 750)  # 1/4 scale, the least that still covers 384 px; not 12 MP


def test_a_compressed_download_is_refused(image_server):
    settings = Settings(image_url_allowlist=[f"{image_server}/images/"])
    with pytest.raises(InvalidInput, match="uncompressed"):
        load(f"{image_server}/images/gzip.png", settings)


def test_a_trickling_download_is_cut_at_the_total_timeout(image_server):
    settings = Settings(image_url_allowlist=[f"{image_server}/images/"], image_url_timeout_s=1.0)
    start = time.monotonic()
    with pytest.raises(InvalidInput, match="image_url_timeout_s"):
        load(f"{image_server}/images/trickle.png", settings)
    assert time.monotonic() - start < 2.5  # each byte came within the read timeout; the total did not


def test_one_request_fetches_at_most_its_share_of_urls_at_once(image_server):
    settings = Settings(image_url_allowlist=[f"{image_server}/images/"], image_url_concurrency=2)
    ImageHandler.most_in_flight = 0

    async def go():
        budget = RequestImages(settings)
        async with httpx.AsyncClient(trust_env=False) as client:
            urls = [f"{image_server}/images/slow-{i}.png" for i in range(6)]
            return await asyncio.gather(*(load_image(u, settings, FIELD, client, budget) for u in urls))

    assert len(asyncio.run(go())) == 6
    assert ImageHandler.most_in_flight == 2


def test_no_free_connection_is_our_fault_not_the_callers(image_server):
    settings = Settings(image_url_allowlist=[f"{image_server}/images/"], image_url_timeout_s=3.0)

    async def go():
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(trust_env=False, limits=limits) as client:
            # Two requests, each with its own budget, share the ingress' one connection.
            return await asyncio.gather(
                *(load_image(f"{image_server}/images/slow-{i}.png", settings, FIELD, client) for i in range(3)),
                return_exceptions=True,
            )

    results = asyncio.run(go())
    assert any(isinstance(r, Image.Image) for r in results)
    assert any(isinstance(r, Overloaded) for r in results), results


def test_one_bad_image_cancels_its_siblings_fetches(image_server):
    from serve_app.media import load_contents
    from serve_app.schemas import ContentSpec, RerankJob

    settings = Settings(image_url_allowlist=[f"{image_server}/images/"])
    slow = [ContentSpec(image=f"{image_server}/images/slower-{i}.png") for i in range(4)]
    job = RerankJob(query=ContentSpec(text="q"), documents=[*slow, ContentSpec(image="not base64!")])

    async def go() -> tuple[float, set]:
        start = time.monotonic()
        with pytest.raises(InvalidInput, match="base64") as info:
            async with httpx.AsyncClient(follow_redirects=False) as http:  # the ingress' client
                await load_contents(job, settings, http)
        assert info.value.field == "documents[4].image"
        return time.monotonic() - start, asyncio.all_tasks() - {asyncio.current_task()}

    elapsed, left = asyncio.run(go())
    assert elapsed < 4  # refused at once, not after the slow fetches (5 s each): room for a loaded machine
    assert not left  # and none of them still running


def test_any_decoder_failure_is_invalid_input(monkeypatch):
    import struct

    from PIL import ImageOps

    def broken_exif(image):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken_exif)
    with pytest.raises(InvalidInput, match="struct.error|error: unpack"):
        load(b64(png_bytes((8, 8))))
