"""The documentation pages: every rendered block agrees with the file it is rendered from (figures are never typed
by hand), every link between the pages resolves, and the README stays a short page that links the others."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from serve_app import pages

ROOT = pages.ROOT
README = ROOT / "README.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def results_named_in(mark: str) -> list[Path]:
    return [ROOT / name for name in re.findall(r"`(bench/results/[^`]+\.json)`", pages.block(mark))]


def test_benchmarks_name_committed_cpu_and_gpu_results():
    named = results_named_in("bench:cpu") + results_named_in("bench:gpu")
    assert len(named) == 2 and all(path.exists() and path.with_suffix(".png").exists() for path in named)


@pytest.mark.parametrize("mark", ["bench:cpu", "bench:gpu"])
def test_side_by_side_tables_match_their_result_files(mark):
    from bench.compare import rendered_block

    (result,) = results_named_in(mark)
    assert rendered_block(result) == (mark, pages.block(mark)), f"run: python -m bench.compare --readme {result}"


@pytest.mark.parametrize("module", ["admission", "tokenize", "cache"])
def test_admission_and_tokenize_tables_match_their_result_files(module):
    bench = importlib.import_module(f"bench.{module}")
    named = results_named_in(bench.README_MARK)
    assert len(named) == 1 and named[0].exists(), f"the {bench.README_MARK} block names no committed result file"
    assert pages.is_current(bench.README_MARK, bench.rendered_block(named[0])), (
        f"run: python -m bench.{module} --readme {named[0]}"
    )


def test_prefix_reuse_table_matches_its_result_files():
    from bench.yes_no import README_MARK, RESULTS, rendered_block

    assert list(RESULTS.glob("yes-no-*.json")), "run: python -m bench.yes_no"
    assert pages.is_current(README_MARK, rendered_block()), "run: python -m bench.yes_no --readme"


def test_multiplex_lines_match_their_result_file():
    from bench.multiplex import README_MARK, RESULTS, rendered_block

    assert (RESULTS / "multiplex-cpu.json").exists(), "run: python -m bench.multiplex"
    assert pages.is_current(README_MARK, rendered_block()), "run: python -m bench.multiplex --readme"


def test_calibration_lines_match_the_shipped_map():
    from serve_app.calibrate_scores import README_MARK, rendered_block

    assert pages.is_current(README_MARK, rendered_block()), "run: python -m serve_app.calibrate_scores --readme"


def test_a_block_is_rendered_on_the_one_page_that_holds_it(tmp_path, monkeypatch):
    """The writer finds the block wherever it lives and refuses a mark that no page, or two pages, hold."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("intro\n<!-- x:a -->\nold\n<!-- /x:a -->\nend\n")
    (tmp_path / "docs" / "p.md").write_text("<!-- x:b -->\n<!-- /x:b -->\n<!-- x:a -->")
    monkeypatch.setattr(pages, "ROOT", tmp_path)
    assert pages.render("x:a", "new\n") == tmp_path / "README.md"
    assert (tmp_path / "README.md").read_text() == "intro\n<!-- x:a -->\nnew\n<!-- /x:a -->\nend\n"
    assert pages.link("x:b", tmp_path / "bench" / "results" / "r.png") == "../bench/results/r.png"
    for missing in ("x:c",):
        with pytest.raises(SystemExit, match="0 pages hold"):
            pages.block(missing)
    (tmp_path / "docs" / "q.md").write_text("<!-- x:b -->\n<!-- /x:b -->")
    with pytest.raises(SystemExit, match="2 pages hold"):
        pages.block("x:b")


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings (lower case, punctuation dropped, spaces as dashes)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    headings = re.findall(r"^#+ (.+)$", text, re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", pages.pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_of_a_page_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)} links to what is not there: {broken}"


def test_the_readme_is_short_and_links_every_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 350, "README.md is the front page: move detail to a page under docs/"
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in LINK.findall(text)}
    unlinked = [str(p.relative_to(ROOT)) for p in pages.pages()[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_the_settings_page_is_written_from_the_fields_and_every_field_says_what_it_does():
    from serve_app import settings

    page = ROOT / settings.SETTINGS_PAGE
    assert page.read_text() == settings.markdown(), "run: python -m serve_app.settings --markdown"
    models = [settings.Settings, settings.TextPoolSettings, settings.ImageTextPoolSettings, settings.ModelSettings]
    models += [settings.SharedPoolSettings, settings.Autoscaling, settings.Calibration]
    silent = [f"{m.__name__}.{name}" for m in models for name, field in m.model_fields.items() if not field.description]
    assert not silent, f"give these fields a description (it is their documentation): {silent}"
