"""The project's documentation pages (README.md, docs/*.md, bench/README.md) and the blocks in them that are
rendered from committed files, never typed by hand: `<!-- MARK -->` ... `<!-- /MARK -->`. Every benchmark, the
score-map report and the settings reference write their block here; tests/test_docs.py checks that each block
agrees with its source and that every link between the pages resolves."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pages() -> list[Path]:
    """Every documentation page, the README first."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]


def _marks(mark: str) -> tuple[str, str]:
    return f"<!-- {mark} -->", f"<!-- /{mark} -->"


def page_with(mark: str) -> Path:
    """The one page holding the block named `mark`."""
    start, end = _marks(mark)
    found = [page for page in pages() if page.exists() and start in (text := page.read_text()) and end in text]
    if len(found) != 1:
        raise SystemExit(f"{len(found)} pages hold a {start} ... {end} block; exactly one must")
    return found[0]


def block(mark: str) -> str:
    """What the block named `mark` holds now, without its marks."""
    start, end = _marks(mark)
    text = page_with(mark).read_text()
    return text[text.index(start) + len(start) : text.index(end)].strip("\n")


def rendered(mark: str, body: str) -> tuple[Path, str]:
    """The page holding `mark`, and its text with that block holding `body`."""
    page = page_with(mark)
    start, end = _marks(mark)
    text = page.read_text()
    new = text[: text.index(start)] + f"{start}\n{body.strip(chr(10))}\n{end}" + text[text.index(end) + len(end) :]
    return page, new


def is_current(mark: str, body: str) -> bool:
    page, text = rendered(mark, body)
    return text == page.read_text()


def render(mark: str, body: str) -> Path:
    """Write `body` into the block named `mark`; returns the page written."""
    page, text = rendered(mark, body)
    page.write_text(text)
    print(f"rendered <!-- {mark} --> in {page.relative_to(ROOT)}")
    return page


def link(mark: str, path: Path) -> str:
    """`path` as a link from the page holding `mark` (a block's image or file link works wherever it lives)."""
    return Path(os.path.relpath(path.resolve(), page_with(mark).parent)).as_posix()
