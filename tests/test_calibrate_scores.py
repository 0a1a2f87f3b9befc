"""Calibration from labels, end to end: the command on the shipped example set, the fitted map in the service
and the bulk job, and the label file's errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from serve_app import bulk, calibrate_scores, score_fit
from serve_app.settings import Settings
from tests.conftest import deploy, undeploy

ROOT = Path(__file__).resolve().parent.parent
LABELS = ROOT / "examples" / "labels"


def calibrate(tmp_path: Path, settings: Settings, *argv: str) -> dict:
    args = calibrate_scores.parse_args(["--out", str(tmp_path), *argv])
    return calibrate_scores.run(args, settings)


@pytest.fixture(scope="module")
def text_fit(tmp_path_factory) -> tuple[dict, Path]:
    """The default text model (real all-MiniLM-L6-v2 weights, from its package) on the shipped text labels."""
    out = tmp_path_factory.mktemp("maps")
    settings = Settings(model_cache_dir=tmp_path_factory.mktemp("cache"))
    return calibrate(out, settings, "--labels", str(LABELS / "text.jsonl")), out


def test_the_command_writes_a_map_and_a_report_for_the_default_text_model(text_fit):
    fitted, out = text_fit
    name = "sentence-transformers_all-MiniLM-L6-v2"
    written = json.loads((out / f"{name}.json").read_text())
    assert written["model"] == "sentence-transformers/all-MiniLM-L6-v2" and written["family"] == "embedding"
    assert written["labels"] == sum(1 for line in (LABELS / "text.jsonl").open() if line.strip())
    assert (out / f"{name}.report.png").stat().st_size > 10_000
    report = json.loads((out / f"{name}.report.json").read_text())["report"]
    assert set(report["strategies"]) == {"strict", "balanced", "explore"}
    assert set(report["suggested"]) == {"strict", "balanced", "explore"}


def test_the_fitted_map_is_monotone_and_lowers_the_held_out_ece(text_fit):
    fitted, _ = text_fit
    score_map = fitted["fit"].score_map
    grid = np.linspace(-1, 1, 401)
    assert np.all(np.diff(score_map.apply(grid)) >= 0)
    held = fitted["map"]["held_out"]
    # The family's guess (sigmoid(10 (cos - 0.5))) against the map fitted on the train side; the note quotes both.
    assert held["ece_after"] < held["ece_before"]
    assert held["ece_after"] < 0.1


def test_the_reports_precision_and_recall_at_each_strategy_equal_a_direct_count(text_fit):
    fitted, _ = text_fit
    rows = calibrate_scores.read_labels(LABELS / "text.jsonl")
    result = fitted["fit"]
    labels = np.array([r["label"] for r in rows])[result.held_idx]
    # The held-out probabilities again, from the raw scores the report was made from.
    raw = np.array(fitted["raw"])[result.held_idx]
    probs = [result.score_map(float(x)) for x in raw]
    for name, row in fitted["report"]["strategies"].items():
        t, inclusive = row["threshold"], row["inclusive"]
        kept = [(p >= t if inclusive else p > t) for p in probs]
        true_positives = sum(k and y == 1 for k, y in zip(kept, labels))
        precision = true_positives / sum(kept) if sum(kept) else None
        recall = true_positives / int(labels.sum())
        assert row["after"]["kept"] == sum(kept), name
        assert row["after"]["recall"] == pytest.approx(recall), name
        assert row["after"]["precision"] == (None if precision is None else pytest.approx(precision)), name


def test_image_text_labels_run_through_a_clip_model(tmp_path, model_dirs):
    settings = Settings(image_text={"model": str(model_dirs["clip"]), "name": "clip"})
    fitted = calibrate(tmp_path, settings, "--labels", str(LABELS / "image_text.jsonl"))
    assert fitted["map"]["name"] == "clip" and fitted["map"]["family"] == "dual_encoder"
    assert (tmp_path / "clip.json").exists()


def write_map(path: Path, model: str, score_map: score_fit.ScoreMap, labels: int = 123) -> Path:
    path.write_text(json.dumps({"name": "mapped", "model": model, "map": score_map.to_json(), "labels": labels}))
    return path


def test_the_served_and_bulk_scores_are_the_fitted_map_of_the_raw_score(serve_url, model_dirs, tmp_path, cluster):
    model = str(model_dirs["cross_encoder"])
    # An isotonic map: a piecewise-linear one that no family default could produce by chance.
    score_map = score_fit.ScoreMap.isotonic([-0.5, 0.0, 0.2, 0.6], [0.05, 0.3, 0.31, 0.9])
    path = write_map(tmp_path / "mapped.json", model, score_map)
    args = {"text": {"model": model, "name": "mapped", "score_map": str(path)}, "image_text": {"enabled": False}}
    deploy("mapped", args)
    try:
        import httpx

        documents = ["paris is the capital of france", "a red car", "the dog", "berlin", "capital city"]
        body = {"query": "capital of france", "documents": documents, "raw_scores": True}
        answer = httpx.post(f"{serve_url}/mapped/v2/rerank", json=body, timeout=60).json()
        for result in answer["results"]:
            assert result["relevance_score"] == pytest.approx(score_map(result["raw_score"]), abs=1e-6)
        (described,) = httpx.get(f"{serve_url}/mapped/v1/models", timeout=60).json()["data"]
        assert described["score_map"] == {"kind": "isotonic", "labels": 123, "source": str(path)}
    finally:
        undeploy("mapped")

    with open(tmp_path / "in.jsonl", "w") as f:
        f.write(json.dumps({"id": "r", "query": "capital of france", "documents": documents}) + "\n")
    bulk.run(bulk.Options(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out")), Settings(**args))
    (row,) = pq.read_table(tmp_path / "out" / "part-00000.parquet").to_pylist()
    for result in row["results"]:
        assert result["relevance_score"] == pytest.approx(score_map(result["raw_score"]), abs=1e-6)


def test_a_map_fitted_for_another_model_is_not_applied(model_dirs, tmp_path):
    from serve_app import hardware, pools

    settings = Settings()
    path = write_map(tmp_path / "other.json", "some/other-model", score_fit.ScoreMap.platt(3.0, 0.1))
    pool = Settings(text={"model": str(model_dirs["cross_encoder"]), "score_map": str(path)}).text
    with pytest.raises(Exception, match="fitted for some/other-model"):
        pools.load_pool("text", pool, hardware.load_profile_rows(settings.batch_profiles_path), tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ('{"query": "q", "document": "d"}', "label` 0 or 1"),
        ('{"query": "q", "document": "d", "label": 2}', "label` 0 or 1"),
        ('{"query": "", "document": "d", "label": 1}', "`query` needs text"),
        ('{"query": "q", "document": {"txt": "d"}, "label": 0}', "`document` needs text"),
    ],
)
def test_a_bad_label_row_is_refused_with_its_line(tmp_path, line, message):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"query": "q", "document": "d", "label": 1}\n' + line + "\n")
    with pytest.raises(calibrate_scores.LabelError, match=f"labels.jsonl:2: .*{message}"):
        calibrate_scores.read_labels(path)


def test_labels_mixing_text_and_image_pairs_need_a_model_taking_both():
    from serve_app.catalog import Catalog

    rows = [{"query": {"text": "q", "image": None}, "document": {"text": None, "image": "x"}},
            {"query": {"text": "q", "image": None}, "document": {"text": "d", "image": None}}]  # fmt: skip
    with pytest.raises(calibrate_scores.LabelError, match="give --model"):
        calibrate_scores.choose_model(rows, None, Catalog(Settings()))


def test_labels_are_scored_as_the_service_scores_a_call_long_documents_as_their_best_window(model_dirs):
    """calibrate_scores runs the replica's steps (scoring.call): a document longer than the model's window gets
    its best window's raw score, so the map is fitted on the scores it will be applied to."""
    from serve_app.catalog import Catalog
    from serve_app.scoring.call import window_rule
    from serve_app.scoring.loading import load_scorer
    from serve_app.scoring.types import Content, Pair
    from tests import direct

    query, document = "what is the capital of france", " ".join(f"word{i} paris city" for i in range(100))
    rows = [{"query": {"text": query, "image": None}, "document": {"text": document, "image": None}, "label": 1}]
    settings = Settings(text={"model": str(model_dirs["cross_encoder"])})
    (raw,), _, _ = calibrate_scores.raw_in_process(rows, Catalog(settings).defaults["text"], settings)
    scorer = load_scorer(str(model_dirs["cross_encoder"]))
    windows = scorer.windows(Pair(Content(text=query), Content(text=document)), window_rule(settings))
    assert len(windows) > 3  # the tiny model's window is 64 tokens
    expected = direct.cross_encoder(model_dirs["cross_encoder"], query, windows)
    assert raw == pytest.approx(max(expected), abs=1e-4)


def test_an_api_key_is_never_taken_as_a_flag_which_the_map_would_record(capsys):
    """The map records its command (`command`), and the report and the docs are rendered from it: a key given as
    --api-key was written into all three. It comes from RERANK_API_KEY only."""
    with pytest.raises(SystemExit):
        calibrate_scores.parse_args(["--labels", str(LABELS / "text.jsonl"), "--url", "http://x", "--api-key", "k"])
    assert "RERANK_API_KEY" in capsys.readouterr().err


def test_without_scikit_learn_the_command_stops_before_scoring_naming_the_extra(monkeypatch, capsys):
    for module in ("sklearn", "sklearn.isotonic", "sklearn.linear_model", "sklearn.metrics"):
        monkeypatch.setitem(sys.modules, module, None)  # `import sklearn...` raises ImportError
    scored = []
    monkeypatch.setattr(calibrate_scores, "raw_in_process", lambda *args: scored.append(args))
    assert calibrate_scores.main(["--labels", str(LABELS / "text.jsonl")]) == 2
    assert 'pip install -e ".[fit]"' in capsys.readouterr().err
    assert not scored
