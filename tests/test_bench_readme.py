"""The README's benchmark tables are rendered from the committed result files, never typed by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.compare import ROOT, render_readme

README = ROOT / "README.md"


def results_named_in_readme() -> list[Path]:
    return [ROOT / name for name in re.findall(r"`(bench/results/[^`]+\.json)`", README.read_text())]


def test_readme_names_a_committed_cpu_result():
    named = results_named_in_readme()
    assert named and all(path.exists() and path.with_suffix(".png").exists() for path in named)


@pytest.mark.parametrize("result", results_named_in_readme(), ids=lambda p: p.name)
def test_readme_table_matches_its_result_file(result):
    assert render_readme(result) == README.read_text(), f"run: python -m bench.compare --readme {result}"
