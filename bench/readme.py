"""What every benchmark does with its result: write the JSON file, print its table, and render it into the
README between `<!-- bench:MARK -->` and `<!-- /bench:MARK -->` (the README's figures are never typed by hand;
tests/test_bench_readme.py checks that they agree with the result files)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def replace_block(text: str, mark: str, body: str) -> str:
    """`text` with the block named `mark` holding `body`."""
    start, end = f"<!-- bench:{mark} -->", f"<!-- /bench:{mark} -->"
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} block")
    return text[: text.index(start)] + f"{start}\n{body}\n{end}" + text[text.index(end) + len(end) :]


def relative(path: Path) -> Path:
    return path.resolve().relative_to(ROOT)


def save(result: dict, out: Path | None, prefix: str, table: Callable[[dict], str]) -> Path:
    """Write the result (default bench/results/<prefix>-<date>-<host>.json) and print its table."""
    out = out or RESULTS / f"{prefix}-{result['date']}-{result['machine']['host']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    print(f"wrote {out}")
    return out
