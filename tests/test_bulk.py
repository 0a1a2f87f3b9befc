"""Bulk reranking as a Ray job: every row exactly once, errors kept, resumable, scores as the service's."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from serve_app.bulk import Options, RowError, parse_row, run
from serve_app.errors import InputTooLarge, InvalidInput
from serve_app.ranking import STRATEGIES, Threshold
from serve_app.settings import Settings
from tests.conftest import BulkJob, b64, bulk_settings, noise_image, processes_naming

ROOT = Path(__file__).resolve().parent.parent
WORDS = "paris capital france city river dog car red blue house tree search model".split()


def write_rows(path: Path, count: int, documents: int = 5, bad: tuple[int, ...] = ()) -> list[str]:
    """JSONL rows with varied texts; rows in `bad` carry a broken image or an empty query."""
    ids = []
    with open(path, "w") as f:
        for i in range(count):
            docs: list = [" ".join(WORDS[(i + j + k) % len(WORDS)] for k in range(3 + j)) for j in range(documents)]
            query = "what is the capital of france"
            if i in bad:
                if i % 2:
                    docs[0] = {"image": "not base64!"}
                else:
                    query = ""
            f.write(json.dumps({"id": f"row-{i}", "query": query, "documents": docs}) + "\n")
            ids.append(f"row-{i}")
    return ids


def output_ids(out: Path) -> list[str]:
    return [row["id"] for part in sorted(out.glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]


def error_ids(out: Path) -> list[str]:
    return [
        json.loads(line)["id"]
        for part in sorted((out / "errors").glob("part-*.jsonl"))
        for line in part.read_text().splitlines()
        if line.strip()
    ]


def assert_exactly_once(out: Path, ids: list[str], bad: list[str]) -> None:
    scored, errors = output_ids(out), error_ids(out)
    assert sorted(errors) == sorted(bad)
    assert sorted(scored + errors) == sorted(ids)  # every id once: none lost, none twice


@pytest.fixture(scope="module")
def jobs(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster.dashboard_url)


def submit(jobs, model_dirs, args: list[str]) -> str:
    """`ray job submit --working-dir . -- python -m serve_app.bulk ...`, through the job client."""
    deadline = time.monotonic() + 120
    while True:  # the head's job agent takes a while to come up after the cluster starts
        try:
            return _submit(jobs, model_dirs, args)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def _submit(jobs, model_dirs, args: list[str]) -> str:
    return jobs.submit_job(
        # The README says `python`; here the interpreter running the tests, which need not be on PATH.
        entrypoint=f"{sys.executable} -m serve_app.bulk " + " ".join(args),
        runtime_env={
            "working_dir": str(ROOT),
            "excludes": [".venv", ".git", "bench/results", "*.pyc"],
            "env_vars": {
                "RERANK_TEXT__MODEL": str(model_dirs["cross_encoder"]),
                "RERANK_IMAGE_TEXT__MODEL": str(model_dirs["clip"]),
                "HF_HUB_OFFLINE": "1",
            },
        },
    )


def wait_for(jobs, job_id: str, states: set[str], timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(jobs.get_job_status(job_id).value)
        if status in states:
            return status
        time.sleep(1)
    raise AssertionError(f"job {job_id} not {states} after {timeout_s} s:\n{jobs.get_job_logs(job_id)[-3000:]}")


def wait_for_shards(out: Path, at_least: int, jobs, job_id: str) -> None:
    deadline = time.monotonic() + 300
    while len(list(out.glob("part-*.parquet"))) < at_least:
        assert str(jobs.get_job_status(job_id).value) in ("PENDING", "RUNNING"), jobs.get_job_logs(job_id)[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)


# A scoring actor's process title (Ray Data's actor of map_batches(PairScorer)).
SCORER = "ray::MapWorker(MapBatches(PairScorer))"


def freeze_scorers(besides: set[int]) -> list[int]:
    """SIGSTOP every scoring actor but those in `besides`: from here on the job scores nothing, so it cannot
    finish before the test acts, however fast this machine scores (a tiny model scores the whole input in
    seconds, and on a loaded machine Ray's own calls take as long)."""
    pids = [pid for pid in processes_naming(SCORER) if pid not in besides]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


def kill_and_reap(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while set(pids) & set(processes_naming(SCORER)):
        assert time.monotonic() < deadline, pids
        time.sleep(0.1)


def committed_shards(out: Path) -> set[int]:
    return {int(p.stem.removeprefix("part-")) for p in out.glob("part-*.parquet")}


def test_a_submitted_job_writes_every_row_once_resumes_when_stopped_and_survives_a_killed_scoring_actor(
    jobs, model_dirs, tmp_path
):
    """One input folder of two files: the shipped example (whose image document is a file in the job's working
    directory, and whose q4 has an empty query) and 800 generated rows (row-6 an empty query, row-7 a broken
    image). Two submitted jobs: the first is stopped after two shards; the second resumes it, and its scoring
    actor is SIGKILLed mid-job: Ray Data restarts it and the job still writes every row once, its errors kept.
    Each job's scoring actor is frozen (SIGSTOP) before the test acts on the job, so neither can finish first."""
    (tmp_path / "in").mkdir()
    example = ROOT / "examples" / "bulk" / "queries.jsonl"
    (tmp_path / "in" / "example.jsonl").write_bytes(example.read_bytes())  # shard 0: files are read in name order
    ids = ["q1", "q2", "q3", "q4"] + write_rows(tmp_path / "in" / "generated.jsonl", 800, documents=6, bad=(6, 7))
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--output", str(out), "--shard-rows", "25"]
    pairs = {0: 3 + 3 + 2} | {s: (25 - len({6, 7} & set(range(25 * s - 25, 25 * s)))) * 6 for s in range(1, 33)}
    others = set(processes_naming(SCORER))  # none expected; never touched

    first = submit(jobs, model_dirs, args)
    wait_for_shards(out, 2, jobs, first)
    frozen = freeze_scorers(others)
    assert frozen, "no scoring actor of the first job"
    jobs.stop_job(first)
    assert wait_for(jobs, first, {"STOPPED", "FAILED", "SUCCEEDED"}) == "STOPPED"
    kill_and_reap(frozen)  # a stopped process may not take the job's own stop signal
    committed = committed_shards(out)
    assert 2 <= len(committed) < len(pairs)

    second = submit(jobs, model_dirs, args)
    wait_for_shards(out, len(committed) + 1, jobs, second)  # the resumed job is scoring
    frozen = freeze_scorers(others)
    assert frozen, "no scoring actor alive mid-job"
    assert str(jobs.get_job_status(second).value) == "RUNNING"  # and it cannot finish while they are stopped
    os.kill(frozen[0], signal.SIGKILL)
    for pid in frozen[1:]:
        os.kill(pid, signal.SIGCONT)
    assert wait_for(jobs, second, {"SUCCEEDED", "FAILED", "STOPPED"}) == "SUCCEEDED", jobs.get_job_logs(second)[-3000:]
    assert_exactly_once(out, ids, ["q4", "row-6", "row-7"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_in"] == 804 and summary["rows_out"] == 801 and summary["errors"] == 3
    assert summary["shards"] == len(pairs) and summary["shards_resumed"] == len(committed)
    # The resumed job scores the pairs of the shards the first left, and only those.
    assert summary["pairs"] == sum(n for s, n in pairs.items() if s not in committed) and summary["pairs_per_s"] > 0
    results = {r["id"]: r["results"] for p in out.glob("part-*.parquet") for r in pq.read_table(p).to_pylist()}
    assert len(results["q3"]) == 2  # its image document was read from the working directory
    logs = jobs.get_job_logs(second)
    assert "rows 804/804" in logs or "done:" in logs


def test_a_rerun_with_other_options_is_refused(bulk_job: BulkJob, model_dirs):
    with pytest.raises(SystemExit, match="different job"):
        run(replace(bulk_job.options, top_n=1), bulk_settings(model_dirs))


def results_by_id(out: Path) -> dict[str, list[dict]]:
    return {
        r["id"]: r["results"] for part in sorted(out.glob("part-*.parquet")) for r in pq.read_table(part).to_pylist()
    }


def test_bulk_scores_equal_the_services(alpha, bulk_job: BulkJob):
    written = results_by_id(bulk_job.out)
    for row in (bulk_job.rows["a"], bulk_job.rows["b"]):  # text documents; an image document
        served = alpha.post(
            "/v2/rerank", json={"query": row["query"], "documents": row["documents"], "raw_scores": True, "top_n": 2}
        ).json()["results"]
        assert [r["index"] for r in written[row["id"]]] == [r["index"] for r in served]
        for mine, theirs in zip(written[row["id"]], served):
            assert mine["raw_score"] == pytest.approx(theirs["raw_score"], abs=1e-5)
            assert mine["relevance_score"] == pytest.approx(theirs["relevance_score"], abs=1e-5)


def test_a_row_is_read_as_the_service_reads_a_request():
    settings = Settings(max_documents_per_request=2, max_text_chars=200)
    options = Options(input="in", output="out", top_n=3, strategy="strict")

    def parse(row: dict):
        return parse_row(row, options, settings, settings.instruction_templates(), check_images=True)

    # The request model's own messages, naming the field.
    with pytest.raises(RowError, match=r"documents\.0.*text"):
        parse({"id": "a", "query": "q", "documents": [{"text": 5}]})
    # Records, as the service takes them: the rank_fields rendered as `name: value` lines, else the only string.
    record = {"id": 3, "title": "Paris", "body": "the capital", "meta": {"year": 2024}}
    parsed = parse({"id": "a", "query": "q", "documents": [record], "rank_fields": ["title", "meta"]})
    assert parsed.job.documents[0].text == 'title: Paris\nmeta: {"year": 2024}'
    assert parse({"id": "a", "query": "q", "documents": [{"n": 1, "txt": "x"}]}).job.documents[0].text == "x"
    with pytest.raises(InvalidInput, match="rank_fields"):
        parse({"id": "a", "query": "q", "documents": [record]})
    with pytest.raises(RowError, match="id"):
        parse({"query": "q", "documents": ["x"]})
    with pytest.raises(RowError, match="not both"):
        parse({"id": "a", "query": "q", "documents": ["x"], "instruction": "i", "instruction_template": "same_topic"})
    # The same limits, with the same errors.
    with pytest.raises(InputTooLarge, match="max_documents_per_request"):
        parse({"id": "a", "query": "q", "documents": ["x", "y", "z"]})
    with pytest.raises(InputTooLarge, match="max_text_chars"):
        parse({"id": "a", "query": "q", "documents": ["x" * 201]})
    with pytest.raises(InvalidInput, match="query is empty"):
        parse({"id": "a", "query": " ", "documents": ["x"]})
    with pytest.raises(InvalidInput, match="no template named"):
        parse({"id": "a", "query": "q", "documents": ["x"], "instruction_template": "nope"})
    with pytest.raises(RowError, match="do not fetch URLs"):
        parse({"id": "a", "query": "q", "documents": [{"image": "https://example.com/a.png"}]})

    # The job's options fill what a row leaves unset; a row's own win; other columns are ignored.
    plain = parse({"id": 7, "query": "q", "documents": ["x"], "source": "crawl-3"})
    assert plain.id == "7" and plain.job.top_n == 3 and plain.job.threshold == STRATEGIES["strict"]
    own = parse({"id": "b", "query": "q", "documents": ["x"], "top_n": 1, "threshold": 0.2, "instruction": "judge"})
    assert (own.job.top_n, own.job.threshold, own.job.instruction) == (1, Threshold(0.2, inclusive=True), "judge")
    templated = parse({"id": "c", "query": "q", "documents": ["x"], "instruction_template": "same_topic"})
    assert templated.job.instruction == settings.instruction_templates()["same_topic"]


def test_a_rows_own_top_n_and_threshold_rank_its_results(bulk_job: BulkJob):
    written = results_by_id(bulk_job.out)
    kept = {name: len(written[name]) for name in ("own", "job", "none_kept")}
    assert kept == {"own": 1, "job": 2, "none_kept": 0}  # its own top_n 1; the job's 2; its threshold 1.0: none


def test_a_job_starts_actors_only_for_the_models_its_rows_go_to(tmp_path):
    from serve_app.bulk import input_files, models_used, plan_shards

    settings = Settings(text={"model": "text-model"}, image_text={"model": "image-model"})

    def used(*rows) -> list[str]:
        (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        shards = plan_shards(input_files(tmp_path / "in.jsonl"), 256)
        return [m.name for m in models_used(shards, Options(input="in", output="out"), settings)]

    text = {"id": "t", "query": "q", "documents": ["a"]}
    image = {"id": "i", "query": "q", "documents": [{"image": b64(noise_image((8, 8), 1))}]}
    assert used(text) == ["text-model"]  # a text-only file starts no image-text actor
    assert used(text, image) == ["text-model", "image-model"]
    assert used({"id": "e", "query": "", "documents": ["a"]}, "not a row") == []  # error rows start none


def test_records_are_typed_with_image_bytes_and_no_sentinels(tmp_path, monkeypatch):
    """What flows through the job's dataset: one typed schema, a field a record lacks is null (no -1 or ""), an
    image is its bytes (a file's as read, base64's decoded), the ranking is columns (no JSON inside a column)."""
    import base64

    import pyarrow as pa

    from serve_app.bulk import RECORD_SCHEMA, expand_shards, input_files, plan_shards

    monkeypatch.chdir(tmp_path)
    encoded = b64(noise_image((8, 8), 2))
    png = base64.b64decode(encoded)
    (tmp_path / "doc.png").write_bytes(png)
    rows = [
        {"id": "a", "query": "q", "documents": [{"image": "doc.png"}, {"text": "t", "image": encoded}], "top_n": 1},
        {"id": "bad", "query": "", "documents": ["x"]},
    ]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shards = pa.Table.from_pylist([vars(s) for s in plan_shards(input_files(tmp_path / "in.jsonl"), 256)])
    settings = Settings(text={"model": "text-model"}, image_text={"model": "image-model"})
    kwargs = {"options": Options(input="in", output="out", strategy="strict"), "settings": settings, "templates": {}}

    headers = expand_shards(shards, "rows", **kwargs)
    pairs = expand_shards(shards, "image-model", **kwargs)
    assert headers.schema == pairs.schema == RECORD_SCHEMA
    ok, bad = headers.to_pylist()
    assert (ok["n_pairs"], ok["top_n"], ok["threshold"], ok["threshold_inclusive"]) == (2, 1, 0.75, False)
    assert ok["error"] is None and ok["doc"] is None and ok["query_image"] is None
    assert bad["id"] == "bad" and "query is empty" in bad["error"] and bad["n_pairs"] is None
    first, second = pairs.to_pylist()
    assert (first["doc"], second["doc"]) == (0, 1) and first["document_image"] == second["document_image"] == png
    assert (first["document_text"], second["document_text"], first["query_text"]) == (None, "t", "q")
    assert first["error"] is None and first["raw"] is None


def test_a_rows_query_image_is_decoded_once_for_all_its_pairs():
    """Each pair record carries its row's query image: decoded once per batch, the same image for every pair (a
    family then reads it once), not once per pair."""
    import base64

    from serve_app.bulk import PairScorer

    png = base64.b64decode(b64(noise_image((16, 16), 4)))
    actor = PairScorer.__new__(PairScorer)
    actor.settings = Settings()
    records = [
        {"query_text": "q", "query_image": png, "document_text": d, "document_image": None, "instruction": None,
         "max_tokens_per_doc": None}
        for d in ("a", "b", "c")
    ]  # fmt: skip
    decoded: dict = {}
    pairs = [actor._pair(record, decoded) for record in records]
    assert len(decoded) == 1 and pairs[0].query.image is pairs[1].query.image is pairs[2].query.image
    assert [p.document.text for p in pairs] == ["a", "b", "c"] and pairs[0].query.text == "q"
