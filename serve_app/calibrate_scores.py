"""Calibration from labels: fit a model's raw -> 0..1 map to labelled pairs, so that 0.8 means the same for
every model and both pools, and report how the strategies' thresholds do on your data.

    python -m serve_app.calibrate_scores --labels examples/labels/text.jsonl [--model NAME] [--url URL]

Rows (JSONL): {"query": text or {"text", "image"}, "document": text or {"text", "image"}, "label": 0 or 1,
"group": optional, e.g. the query's id, so that a query's pairs fall on one side of the held-out split}.
Images are base64 (or data URIs). The pairs are scored in-process through the scorer path a replica uses
(pools.load_pool, the pool's settings), or through a running service with --url (raw scores over HTTP; its
API key from RERANK_API_KEY, never a flag, which would be recorded in the map).

Writes <out>/<name>.json, the map the model's pool loads at start-up (its `score_map` setting, or by default
deploy/score_maps/<name>.json), and <out>/<name>.report.json + .png: precision, recall and F1 against the
threshold, the reliability diagram and ECE before and after on the held-out split, each strategy's
precision/recall on these labels, and the thresholds to suggest for them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np

from serve_app import pages, score_fit
from serve_app.catalog import Catalog, Served, modality_counts, modality_of
from serve_app.errors import RerankError
from serve_app.settings import DEFAULT_TEXT_MODEL, Settings, env_name, score_map_path

log = logging.getLogger("serve_app.calibrate_scores")
API_KEY_ENV = env_name("api_key")  # the service's own setting; with several keys, the first is used
ROOT = Path(__file__).resolve().parent.parent


class LabelError(ValueError):
    pass


def read_labels(path: Path) -> list[dict]:
    """The rows, each checked: a query and a document (text and/or image) and a 0/1 label."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LabelError(f"{path}:{number}: not JSON ({exc.msg})") from None
            if not isinstance(row, dict) or row.get("label") not in (0, 1, True, False):
                raise LabelError(f"{path}:{number}: give an object with `query`, `document` and `label` 0 or 1")
            for side in ("query", "document"):
                value = row.get(side)
                if isinstance(value, str):
                    value = {"text": value}
                if not isinstance(value, dict) or not (value.get("text") or value.get("image")):
                    raise LabelError(f"{path}:{number}: `{side}` needs text, an image or both")
                row[side] = {"text": value.get("text"), "image": value.get("image")}
            row["label"] = int(row["label"])
            row["group"] = str(row.get("group", number))
            rows.append(row)
    if not rows:
        raise LabelError(f"{path}: no labelled rows")
    return rows


def kinds(rows: list[dict]) -> dict[str, int]:
    return modality_counts([modality_of(bool(r["query"]["image"]), bool(r["document"]["image"])) for r in rows])


def choose_model(rows: list[dict], name: str | None, catalog: Catalog) -> Served:
    """--model, or the one default model every row's pair goes to."""
    models = {m.name: m for m in catalog.route(name, kinds(rows)).values()}
    if len(models) != 1:
        raise LabelError(
            f"these labels hold text and image pairs, which go to {sorted(models)}: a map is fitted per model, so "
            "give --model (a model that takes both) or split the labels"
        )
    return next(iter(models.values()))


def raw_in_process(rows: list[dict], served: Served, settings: Settings) -> tuple[list[float], object, str]:
    """Raw scores through the path a replica scores a call by (long documents as the service cuts them); the
    family's own map; the family."""
    from serve_app import hardware, pools
    from serve_app.media import content_from, decode_base64
    from serve_app.scoring.call import score_call, window_rule
    from serve_app.scoring.types import Pair

    def content(side: dict, field: str):
        image = decode_base64(side["image"], settings, f"{field}.image") if side["image"] else None
        return content_from(side["text"], image, settings, field)

    profiles = hardware.load_profile_rows(settings.batch_profiles_path)
    # The fitted map off: "before" is the family's own map (or the pool's `calibration` setting), not a map fitted
    # earlier from labels.
    loaded = pools.load_pool(
        served.modality, served.settings, profiles, settings.model_cache_dir, warm_up=False, fitted_map=False
    )
    scorer = loaded.scorer
    pairs = [Pair(content(r["query"], f"row {i} query"), content(r["document"], f"row {i} document"))
             for i, r in enumerate(rows)]  # fmt: skip

    def progress(done: int, total: int) -> None:
        log.info("scored %d/%d pairs", done, total)

    scores = score_call(scorer, pairs, loaded.profile.max_batch_size, window_rule(settings), progress=progress)
    return [score.raw for score in scores], scorer.calibrator, scorer.info.family


def raw_over_http(rows: list[dict], served: Served, url: str, api_key: str | None) -> tuple[list[float], object, str]:
    """Raw scores from a running service (one request per query group); its served scores are the 'before'."""
    import httpx

    headers = {"X-API-Key": api_key} if api_key else {}
    raw: list[float] = [0.0] * len(rows)
    served_scores: dict[float, float] = {}
    by_query: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        by_query.setdefault((row["group"], json.dumps(row["query"], sort_keys=True)), []).append(i)
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=300) as http:
        for (_, query), indices in by_query.items():
            body = {
                "model": served.name,
                "query": json.loads(query),
                "documents": [rows[i]["document"] for i in indices],
                "raw_scores": True,
            }
            body["query"] = {k: v for k, v in body["query"].items() if v is not None}
            body["documents"] = [{k: v for k, v in d.items() if v is not None} for d in body["documents"]]
            response = http.post("/v2/rerank", json=body)
            if response.status_code != 200:
                raise LabelError(f"{url}: {response.status_code}: {response.text[:500]}")
            for result in response.json()["results"]:
                raw[indices[result["index"]]] = result["raw_score"]
                served_scores[result["raw_score"]] = result["relevance_score"]
        family = next((m.get("family") for m in http.get("/v1/models").json()["data"] if m["id"] == served.name), None)
    return raw, served_scores.__getitem__, family or "unknown"


def run(args: argparse.Namespace, settings: Settings | None = None) -> dict:
    settings = settings or Settings()
    score_fit.load_sklearn()  # before any pair is scored: without the `fit` extra the fit would fail at the end
    rows = read_labels(args.labels)
    served = choose_model(rows, args.model, Catalog(settings))
    if args.url:
        # The key comes from the environment only: a flag's value would be recorded in the map's `command`,
        # its report and the docs rendered from them.
        raw, before, family = raw_over_http(
            rows, served, args.url, os.environ.get(API_KEY_ENV, "").split(",")[0].strip() or None
        )
    else:
        raw, before, family = raw_in_process(rows, served, settings)
    labels = [r["label"] for r in rows]
    result = score_fit.fit(raw, labels, [r["group"] for r in rows], args.min_isotonic, before, seed=args.seed)
    held = result.held_idx
    report = score_fit.report(np.asarray(raw)[held], np.asarray(labels)[held], result.score_map, before)
    out = args.out or score_map_path(served.name).parent
    out.mkdir(parents=True, exist_ok=True)
    stem = score_map_path(served.name).stem
    fitted = {
        "name": served.name,
        "model": served.settings.model,
        "family": family,
        "map": result.score_map.to_json(),
        "labels": len(rows),
        "positives": int(sum(labels)),
        "held_out": {
            "rows": int(held.size),
            "ece_before": result.ece_before,
            "ece_after": result.ece_after,
            "log_loss": result.log_loss,
        },
        # Each strategy's threshold for this model, chosen on the held-out split (null: its promise could not be
        # kept there, and the service falls back to the fixed threshold): what /v2/rerank's `strategy` applies.
        "thresholds": report["fitted_thresholds"],
        "fitted": datetime.date.today().isoformat(),
        "source": str(args.labels),
        "command": " ".join(["python -m serve_app.calibrate_scores", *args.argv]),
    }
    (out / f"{stem}.json").write_text(json.dumps(fitted, indent=1) + "\n")
    (out / f"{stem}.report.json").write_text(json.dumps({**fitted, "fit": result.to_json(), "report": report}) + "\n")
    score_fit.plot_report(report, out / f"{stem}.report.png")
    print_summary(fitted, report, out / f"{stem}.json")
    return {"map": fitted, "report": report, "fit": result, "raw": raw}


def print_summary(fitted: dict, report: dict, path: Path) -> None:
    held = fitted["held_out"]
    before = "n/a" if held["ece_before"] is None else f"{held['ece_before']:.3f}"
    print(f"{fitted['name']}: {fitted['map']['kind']} map from {fitted['labels']} labels -> {path}")
    print(f"held-out ECE {before} before, {held['ece_after']:.3f} after ({held['rows']} rows)")
    print("strategy   threshold  precision  recall  (on the held-out labels, after the map)  suggested")
    for name, row in report["strategies"].items():
        after = row["after"]
        precision = "n/a" if after["precision"] is None else f"{after['precision']:.2f}"
        recall = "n/a" if after["recall"] is None else f"{after['recall']:.2f}"
        suggested = report["suggested"].get(name)
        print(f"{name:<10} {row['threshold']:<10} {precision:<10} {recall:<7} {'':41}{suggested}")


README_MARK = "calibration:text"


def readme_lines(report_path: Path) -> str:
    """The docs' lines on the shipped map, from its report file: each strategy's fixed fallback against the
    threshold fitted for this model, each with its precision and recall on the held-out pairs."""
    written = json.loads(report_path.read_text())
    held, report = written["held_out"], written["report"]

    def cells(row: dict | None) -> str:
        if row is None:
            return "not reachable (the fixed one applies) | | "
        return f"{row['threshold']} | {row['precision']:.2f} | {row['recall']:.2f}"

    promises = {"strict": "precision >= 0.95", "balanced": "best F1", "explore": "recall >= 0.95"}
    rows = "".join(
        f"| {written['name']} | {name} | {promises[name]} | {row['threshold']} | {row['after']['precision']:.2f} "
        f"| {row['after']['recall']:.2f} | {cells(report['fitted_thresholds'][name])} |\n"
        for name, row in report["strategies"].items()
    )
    return (
        f"On it, the default text model ({written['model']}, real weights) gets a {written['map']['kind']} map "
        f"(`{report_path.with_name(report_path.name.replace('.report', '')).relative_to(ROOT)}`, shipped): "
        f"held-out ECE **{held['ece_before']:.3f} with the family's guess, {held['ece_after']:.3f} with the map** "
        f"({held['rows']} held-out pairs; `{written['command']}`). Each strategy's threshold for the model, fitted "
        "on the held-out pairs, against the fixed fallback (precision and recall on the held-out pairs, after the "
        "map):\n\n"
        "| model | strategy | promise | fixed threshold | precision | recall | the model's threshold | precision "
        "| recall |\n|---|---|---|---|---|---|---|---|---|\n" + rows
    )


def rendered_block() -> str:
    """The docs block (docs/models.md, `<!-- calibration:text -->`) from the shipped map's report."""
    return readme_lines(score_map_path(DEFAULT_TEXT_MODEL).with_suffix(".report.json"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serve_app.calibrate_scores", description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=Path, help="JSONL: query, document, label 0/1, group")
    parser.add_argument("--model", help="served model name or alias (default: the default model of the pairs)")
    parser.add_argument("--url", help="score through a running service instead of in-process")
    parser.add_argument(
        "--api-key", help=f"refused: the key is read from {API_KEY_ENV} (a flag would be recorded in the map)"
    )
    parser.add_argument("--out", type=Path, help="where the map goes (default: deploy/score_maps)")
    parser.add_argument("--min-isotonic", type=int, default=200, help="train labels needed to try isotonic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--readme", action="store_true", help="render the docs' lines from the shipped map")
    args = parser.parse_args(argv)
    if not args.readme and args.labels is None:
        parser.error("--labels is required")
    if args.api_key is not None:
        parser.error(f"--api-key would be written into the map and its report: set {API_KEY_ENV} instead")
    args.argv = sys.argv[1:] if argv is None else argv
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.readme:
        pages.render(README_MARK, rendered_block())
        return 0
    try:
        run(args)
    except (LabelError, RerankError, score_fit.FitExtraMissing) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
