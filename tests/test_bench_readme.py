"""The README's benchmark tables are rendered from the committed result files, never typed by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.compare import ROOT, render_readme

README = ROOT / "README.md"


def results_named_in_readme() -> list[Path]:
    """The result files the README's bench:cpu and bench:gpu sections are rendered from."""
    sections = re.findall(r"<!-- bench:(?:cpu|gpu) -->(.*?)<!-- /bench:", README.read_text(), re.S)
    return [ROOT / name for section in sections for name in re.findall(r"`(bench/results/[^`]+\.json)`", section)]


def test_readme_names_committed_cpu_and_gpu_results():
    named = results_named_in_readme()
    assert len(named) == 2 and all(path.exists() and path.with_suffix(".png").exists() for path in named)


@pytest.mark.parametrize("result", results_named_in_readme(), ids=lambda p: p.name)
def test_readme_table_matches_its_result_file(result):
    assert render_readme(result) == README.read_text(), f"run: python -m bench.compare --readme {result}"


def test_readme_prefix_reuse_table_matches_its_result_files():
    from bench.yes_no import RESULTS, rendered_readme

    assert list(RESULTS.glob("yes-no-*.json")), "run: python -m bench.yes_no"
    assert rendered_readme() == README.read_text(), "run: python -m bench.yes_no --readme"


def test_readme_multiplex_lines_match_their_result_file():
    from bench.multiplex import RESULTS, rendered_readme

    assert (RESULTS / "multiplex-cpu.json").exists(), "run: python -m bench.multiplex"
    assert rendered_readme() == README.read_text(), "run: python -m bench.multiplex --readme"


def test_readme_calibration_lines_match_the_shipped_map():
    from serve_app.calibrate_scores import rendered_readme

    assert rendered_readme() == README.read_text(), "run: python -m serve_app.calibrate_scores --readme"


def result_in_block(mark: str) -> Path:
    block = re.search(rf"<!-- bench:{mark} -->(.*?)<!-- /bench:{mark} -->", README.read_text(), re.S)
    assert block, f"README.md has no bench:{mark} block"
    named = re.findall(r"`(bench/results/[^`]+\.json)`", block.group(1))
    assert len(named) == 1, f"the bench:{mark} block names no result file: run its benchmark with --readme"
    return ROOT / named[0]


@pytest.mark.parametrize("module", ["admission", "tokenize"])
def test_readme_admission_and_tokenize_tables_match_their_result_files(module):
    import importlib

    bench = importlib.import_module(f"bench.{module}")
    result = result_in_block(bench.README_MARK)
    assert result.exists()
    assert bench.render_readme(result) == README.read_text(), f"run: python -m bench.{module} --readme {result}"
