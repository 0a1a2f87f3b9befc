"""Image input: base64, data URI and allow-listed URLs -> checked RGB images, with every limit enforced."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from serve_app.errors import InputTooLarge, InvalidInput
from serve_app.media import load_image, url_allowed
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


def test_url_allowed_rejects_dot_segments_leaving_the_allowed_path():
    assert not url_allowed("https://cdn.example.org/images/../private/cat.png", ALLOWLIST)


def test_url_allowed_entry_path_ends_at_a_segment_boundary():
    assert not url_allowed("https://cdn.example.org/images-private/cat.png", ["https://cdn.example.org/images"])


def test_url_allowed_with_empty_allow_list_rejects_everything():
    assert not url_allowed("https://img.example.com/cat.png", [])


def test_allow_list_setting_splits_comma_separated_string():
    settings = Settings(image_url_allowlist="https://a.example.com/, https://b.example.com/x/")
    assert settings.image_url_allowlist == ["https://a.example.com/", "https://b.example.com/x/"]


IMAGE_PNG = png_bytes((300, 150))


class ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path == "/images/photo.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(IMAGE_PNG)))
            self.end_headers()
            self.wfile.write(IMAGE_PNG)
        else:
            self.send_error(404)

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
