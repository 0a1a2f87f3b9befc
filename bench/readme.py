"""What every benchmark does with its result: write the JSON file and print its table. Its `--readme` renders the
result into its block of the docs (`serve_app.pages`: the figures are never typed by hand; tests/test_docs.py
checks that they agree with the result files)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


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
