"""The bulk job against hostile rows and careless operators: every bad row becomes an error row with its
reason, the job finishes, and its output stays one job's."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from serve_app import bulk
from serve_app.bulk import Output, PairScorer, parse_args, run
from serve_app.scoring.types import Content, Pair, Score, ScorerInfo, Windows
from serve_app.settings import Settings
from tests.conftest import BulkJob, bulk_settings


def errors_of(job: BulkJob) -> dict[str, str]:
    """Each error row's reason, by its id, or by "line N" (from 1) where the row has no readable id."""
    errors = [
        json.loads(line) for part in (job.out / "errors").glob("part-*.jsonl") for line in part.read_text().splitlines()
    ]
    return {str(e["id"]) or f"line {e['shard'] * job.shard_rows + e['row'] + 1}": e["error"] for e in errors}


def ids_of(out: Path) -> list[str]:
    return [r["id"] for part in sorted(out.glob("part-*.parquet")) for r in pq.read_table(part).to_pylist()]


def test_rows_that_cannot_be_read_become_error_rows_and_the_job_finishes(bulk_job: BulkJob):
    assert "good-2" in ids_of(bulk_job.out)  # the good row after them
    errors = errors_of(bulk_job)
    assert bulk_job.summary["rows_out"] + bulk_job.summary["errors"] == len(bulk_job.lines)
    line = {bulk_job.lines.index(text) + 1 for text in bulk_job.lines if b"bad-utf8" in text}.pop()
    assert "UTF-8" in errors[f"line {line}"] or "utf-8" in errors[f"line {line}"]
    line = {bulk_job.lines.index(text) + 1 for text in bulk_job.lines if b'"deep"' in text}.pop()
    assert "nest" in errors[f"line {line}"].lower()
    assert "documents" in errors["text-not-a-string"] and "documents" in errors["image-not-a-string"]
    line = bulk_job.lines.index(b'["not", "an", "object"]') + 1
    assert "not a JSON object" in errors[f"line {line}"]


def test_one_pair_failing_in_a_way_nobody_foresaw_fails_its_own_row_only():
    class Flaky:
        """Scores pairs, but not the one whose document says "boom" (a model error, not a ScoringError)."""

        info = ScorerInfo("flaky", "test", "cpu", "float32", 64, raw_score="length", calibration="length / 10")

        def check(self, pairs, truncate):
            pass

        def score(self, pairs):
            if any(p.document.text == "boom" for p in pairs):
                raise RuntimeError("index out of range in self")
            return [float(len(p.document.text)) for p in pairs]

        def calibrate(self, raw):
            return [Score(r, r / 10) for r in raw]

        def expand_windows(self, pairs, rule):
            return Windows.whole(pairs)

    actor = PairScorer.__new__(PairScorer)
    actor.scorer, actor.settings, actor.cap = Flaky(), Settings(), 8
    pairs = [Pair(Content(text="q"), Content(text=t)) for t in ("ok", "boom", "fine")]
    errors = ["", "", ""]
    scored = dict((i, s) for indices, scores in actor._score(pairs, [0, 1, 2], errors) for i, s in zip(indices, scores))
    assert sorted(scored) == [0, 2] and scored[2].raw == 4.0
    assert "RuntimeError" in errors[1] and not errors[0] and not errors[2]


def test_resuming_with_another_model_is_refused(bulk_job: BulkJob, model_dirs):
    with pytest.raises(SystemExit, match="model"):
        run(bulk_job.options, bulk_settings(model_dirs, "cross_encoder_2"))


def test_two_runs_cannot_write_one_output_at_once(tmp_path):
    first = Output(tmp_path / "out", "parquet")
    (tmp_path / "out" / ".tmp-00001.parquet").write_bytes(b"half a shard")
    with pytest.raises(SystemExit, match="another run"):
        Output(tmp_path / "out", "parquet")
    assert (tmp_path / "out" / ".tmp-00001.parquet").exists()  # the first run's file is left alone
    first.close()
    Output(tmp_path / "out", "parquet").close()  # free again once the first run ends (or dies)
    assert not (tmp_path / "out" / ".tmp-00001.parquet").exists()


def test_a_committed_shard_is_on_disk_before_it_counts(tmp_path, monkeypatch):
    synced = []
    real_fsync = bulk.os.fsync
    monkeypatch.setattr(bulk.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    out = Output(tmp_path / "out", "parquet")
    out.commit(0, [{"id": "a", "results": []}], [])
    out.close()
    assert len(synced) >= 4  # errors file, its folder, the part file, its folder


def test_a_duplicate_id_is_an_error_row_not_a_second_result(bulk_job: BulkJob):
    ids = ids_of(bulk_job.out)
    assert ids.count("same") == 1 and ids.count("other") == 1
    assert "duplicate id" in errors_of(bulk_job)["same"]


@pytest.mark.parametrize(
    "args",
    [["--top-n", "-1"], ["--top-n", "0"], ["--threshold", "1.5"], ["--threshold", "-0.1"], ["--shard-rows", "0"],
     ["--text-actors", "0"]],
)  # fmt: skip
def test_nonsense_options_are_refused(args):
    with pytest.raises(SystemExit):
        parse_args(["--input", "in.jsonl", "--output", "out", *args])
