"""Bulk reranking as a Ray job (`python -m serve_app.bulk`): every input row scored exactly once, resumable.

Input rows (JSONL or Parquet, a file or a folder) are cut into shards. Ray Data reads each shard,
splits its rows into pairs, and scores them on actor pools of the service's own scorers (one pool
for text pairs, one for image-text pairs, batch sizes from the same GPU profiles). The driver
gathers the scores of each row; once every row of a shard is in, the shard's results and errors are
written and committed by an atomic rename. A rerun with the same output scores only the shards
that are not committed yet.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from serve_app import hardware
from serve_app.catalog import Catalog, Served, modality_counts, modality_of
from serve_app.errors import RerankError
from serve_app.hardware import Device
from serve_app.media import content_from, decode_base64, is_url, open_image
from serve_app.ranking import STRATEGIES, Threshold, model_strategies, per_document, rank
from serve_app.schemas import BulkRow, ContentSpec, RerankJob, check_limits, describe_errors
from serve_app.scoring.call import score_call, window_rule
from serve_app.scoring.types import Content, ModelLoadError, Pair, Score, ScoringError
from serve_app.settings import MODALITIES, PoolSettings, Settings, score_map_path

log = logging.getLogger("serve_app.bulk")

PROGRESS_EVERY_S = 5.0
# Reading and splitting rows is light: it reserves no CPU, so actors that take every CPU cannot starve
# it (a deadlock), and only a few such tasks run at once, so the node is not flooded with worker
# processes (each one imports torch).
EXPAND_CPUS = 0
EXPAND_TASKS = 2
RESULT_TYPE = pa.list_(
    pa.struct([("index", pa.int32()), ("relevance_score", pa.float64()), ("raw_score", pa.float64())])
)
OUTPUT_SCHEMA = pa.schema([("id", pa.string()), ("results", RESULT_TYPE)])
# What flows through the job's dataset, one record per input row ("row": its id, pair count and ranking, or
# why it cannot be scored) and per pair ("pair": what its model scores, then its scores or why it failed).
# A field a record does not have is null; images travel as their bytes.
RECORD_SCHEMA = pa.schema(
    [
        ("shard", pa.int32()),
        ("row", pa.int32()),
        ("kind", pa.string()),  # "row" | "pair"
        ("id", pa.string()),
        ("doc", pa.int32()),  # pair: the document's index in its row
        ("n_pairs", pa.int32()),  # row: how many pairs it has
        ("top_n", pa.int32()),  # row: its ranking
        ("threshold", pa.float64()),
        ("threshold_inclusive", pa.bool_()),
        ("thresholds", pa.list_(pa.float64())),  # row with a strategy: each document's, by the model scoring it
        ("thresholds_inclusive", pa.list_(pa.bool_())),
        ("query_text", pa.string()),  # pair: what is scored
        ("query_image", pa.binary()),
        ("document_text", pa.string()),
        ("document_image", pa.binary()),
        ("instruction", pa.string()),
        ("max_tokens_per_doc", pa.int32()),
        ("error", pa.string()),  # why the row or the pair failed
        ("raw", pa.float64()),  # pair: its scores
        ("score", pa.float64()),
    ]
)
# What a scored pair no longer needs to carry back to the driver.
PAIR_INPUTS = ("query_text", "query_image", "document_text", "document_image", "instruction", "max_tokens_per_doc")


# ---- input: shards, rows, pairs ------------------------------------------------------------------


@dataclass(frozen=True)
class Shard:
    """A slice of one input file: byte range of a JSONL file, or one row group of a Parquet file."""

    index: int
    path: str
    rows: int
    start: int  # JSONL: byte offset; Parquet: row group
    stop: int  # JSONL: byte offset; Parquet: unused


def input_files(path: Path) -> list[Path]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".parquet")) if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"no .jsonl or .parquet files in {path}")
    return files


def plan_shards(files: list[Path], shard_rows: int) -> list[Shard]:
    """Shards in a fixed order, so a rerun cuts the same input the same way."""
    shards: list[Shard] = []
    for path in files:
        if path.suffix == ".parquet":
            metadata = pq.ParquetFile(path).metadata
            for group in range(metadata.num_row_groups):
                shards.append(Shard(len(shards), str(path), metadata.row_group(group).num_rows, group, 0))
            continue
        with open(path, "rb") as f:
            start, offset, rows = 0, 0, 0
            for line in f:
                offset += len(line)
                if line.strip():
                    rows += 1
                if rows == shard_rows:
                    shards.append(Shard(len(shards), str(path), rows, start, offset))
                    start, rows = offset, 0
            if rows:
                shards.append(Shard(len(shards), str(path), rows, start, offset))
    return shards


def read_shard(shard: Shard) -> list[dict | str]:
    """The shard's rows, parsed; a line that is not JSON stays a string (and becomes an error row)."""
    if shard.path.endswith(".parquet"):
        return pq.ParquetFile(shard.path).read_row_group(shard.start).to_pylist()
    with open(shard.path, "rb") as f:
        f.seek(shard.start)
        lines = [line for line in f.read(shard.stop - shard.start).splitlines() if line.strip()]
    rows: list[dict | str] = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError as exc:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
            rows.append(f"not JSON: {type(exc).__name__}: {str(exc)[:200]}")
        except RecursionError:
            rows.append("not JSON this service reads: nested too deeply")
    return rows


class RowError(ValueError):
    pass


def image_bytes(value: str, settings: Settings, field: str) -> bytes:
    """base64 / data URI, or a file inside the job's working directory."""
    if is_url(value):
        raise RowError(f"{field}: bulk jobs do not fetch URLs; give the image as base64 or a file path")
    candidate = Path(value)
    if len(value) < 1024 and candidate.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"):
        resolved = candidate.resolve()
        if candidate.is_absolute() or not resolved.is_relative_to(Path.cwd().resolve()):
            raise RowError(f"{field}: image paths must be relative and inside the job's working directory")
        if not resolved.is_file():
            raise RowError(f"{field}: no such image file {value}")
        data = resolved.read_bytes()
        if len(data) > settings.max_image_bytes:
            raise RowError(f"{field}: image is larger than {settings.max_image_bytes} bytes (max_image_bytes)")
        return data
    return decode_base64(value, settings, field)


@dataclass(frozen=True)
class Side:
    """A query or document as a record carries it: its text and its image's bytes (read from base64 or a file)."""

    text: str | None
    image: bytes | None


def side_of(spec: ContentSpec, settings: Settings, field: str, check_images: bool) -> Side:
    """A query or document's record fields; an image path is read, and decoded when checked."""
    image = None
    if spec.image is not None:
        image = image_bytes(spec.image, settings, f"{field}.image")
        if check_images:
            open_image(image, settings, f"{field}.image")
    return Side(spec.text, image)


def pool_of(query: Side, document: Side, pool: str) -> str:
    if pool != "auto":
        return pool
    return modality_of(query.image is not None, document.image is not None)


@dataclass(frozen=True)
class ParsedRow:
    id: str
    job: RerankJob
    query: Side
    documents: list[Side]
    models: list[str]  # the served model that scores each document's pair


def route_row(query: Side, documents: list[Side], model: str | None, options: Options, catalog: Catalog) -> list[str]:
    """Each document's model, as the service picks it: the row's `model`, else --model, else the default of its
    kind of pair (or of --pool's)."""
    kinds = [pool_of(query, d, options.pool) for d in documents]
    routes = catalog.route(model or options.model, modality_counts(kinds))
    return [routes[kind].name for kind in kinds]


def with_defaults(row: dict, options: Options) -> dict:
    """The row, with the job's options where it leaves them unset (a row's own top_n, strategy or
    threshold, instruction or template win)."""
    merged = dict(row)
    if merged.get("top_n") is None:
        merged["top_n"] = options.top_n
    if merged.get("strategy") is None and merged.get("threshold") is None:
        merged.update(strategy=options.strategy, threshold=options.threshold)
    if merged.get("instruction") is None and merged.get("instruction_template") is None:
        merged["instruction_template"] = options.instruction_template
    return merged


def parse_row(
    row: dict | str, options: Options, settings: Settings, templates: dict[str, str], check_images: bool
) -> ParsedRow:
    """A row as the HTTP API reads a request: the same model, conversion and limits."""
    if isinstance(row, str):
        raise RowError(row)  # why read_shard could not read it
    if not isinstance(row, dict):
        raise RowError(f"row is not a JSON object but a {type(row).__name__}; give each row as an object")
    try:
        request = BulkRow.model_validate(with_defaults(row, options))
    except ValidationError as exc:
        raise RowError(describe_errors(exc.errors())[0]) from None
    job = request.to_job(templates)
    check_limits(job, settings)
    query = side_of(job.query, settings, "query", check_images)
    documents = [side_of(d, settings, f"documents[{i}]", check_images) for i, d in enumerate(job.documents)]
    if options.pool == "text" and (query.image is not None or any(d.image is not None for d in documents)):
        raise RowError("row has images but --pool text was asked for; use --pool auto or image_text")
    models = route_row(query, documents, request.model, options, Catalog(settings))
    return ParsedRow(str(request.id), job, query, documents, models)


def row_id(row: object) -> str:
    """A row's id for its error record, where it has a readable one."""
    value = row.get("id") if isinstance(row, dict) else None
    return str(value)[:200] if isinstance(value, (str, int)) else ""


def expand(
    shard_item: dict, branch: str, options: Options, settings: Settings, templates: dict[str, str]
) -> list[dict]:
    """Records of one shard (RECORD_SCHEMA). Branch "rows": one record per row (its id, pair count and ranking
    options, or why it cannot be scored); any other branch is a served model's name: the pairs that model
    scores."""
    shard = Shard(**shard_item)
    records = []
    strategies = {m.name: model_strategies(m.settings, m.name) for m in Catalog(settings).models}
    for row_index, row in enumerate(read_shard(shard)):
        base = {"shard": shard.index, "row": row_index}
        try:
            parsed = parse_row(row, options, settings, templates, check_images=branch == "rows")
        except Exception as exc:  # noqa: BLE001 - a row nobody foresaw fails itself, never its shard or the job
            if branch == "rows":
                reason = str(exc) if isinstance(exc, (RowError, RerankError)) else f"{type(exc).__name__}: {exc}"
                records.append({**base, "kind": "row", "id": row_id(row), "error": reason[:1000]})
            continue
        base["id"] = parsed.id
        if branch == "rows":
            threshold = parsed.job.threshold
            by_model: dict[str, list[int]] = {}
            for doc_index, model in enumerate(parsed.models):
                by_model.setdefault(model, []).append(doc_index)
            # A strategy is each model's own threshold, as the service applies it.
            own = per_document(parsed.job, by_model, strategies) if threshold and threshold.strategy else None
            records.append(
                {
                    **base,
                    "kind": "row",
                    "n_pairs": len(parsed.documents),
                    "top_n": parsed.job.top_n,
                    "threshold": threshold.value if threshold else None,
                    "threshold_inclusive": threshold.inclusive if threshold else None,
                    "thresholds": [t.value for t in own] if own else None,
                    "thresholds_inclusive": [t.inclusive for t in own] if own else None,
                }
            )
            continue
        for doc_index, (document, model) in enumerate(zip(parsed.documents, parsed.models)):
            if model == branch:
                records.append(
                    {
                        **base,
                        "kind": "pair",
                        "doc": doc_index,
                        "query_text": parsed.query.text,
                        "query_image": parsed.query.image,
                        "document_text": document.text,
                        "document_image": document.image,
                        "instruction": parsed.job.instruction,
                        "max_tokens_per_doc": parsed.job.max_tokens_per_doc,
                    }
                )
    return records


def expand_shards(shards: pa.Table, branch: str, **kwargs) -> pa.Table:
    """`expand` over a batch of shards, as a typed table."""
    records = [record for item in shards.to_pylist() for record in expand(item, branch, **kwargs)]
    return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)


# ---- scoring actors -------------------------------------------------------------------------------


def served_model(name: str, settings: Settings) -> Served:
    """A served model by name; a pool's name ("text", "image_text") stands for that pool's default."""
    catalog = Catalog(settings)
    return catalog.defaults[name] if name in MODALITIES and name in catalog.defaults else catalog.find(name)


class PairScorer:
    """A Ray Data actor holding one model's scorer, loaded as the service loads it (pools.load_pool)."""

    def __init__(self, model: str, settings: Settings) -> None:
        self.settings = settings
        self.scorer = None
        self.load_error: str | None = None
        from serve_app import pools  # torch: in the scoring actors only, not the driver or the row tasks

        rows = hardware.load_profile_rows(settings.batch_profiles_path)
        served = served_model(model, settings)
        try:
            loaded = pools.load_pool(served.modality, served.settings, rows, settings.model_cache_dir, name=served.name)
            self.scorer, self.cap = loaded.scorer, loaded.profile.max_batch_size
        except ModelLoadError as exc:
            # As in the service: the job goes on; this model's pairs fail their rows, with the reason.
            self.load_error = f"the model {served.name} is unavailable: {exc}"

    def _pair(self, record: dict, decoded: dict[bytes, Content]) -> Pair:
        """A pair record as a Pair; an image decoded once per batch (a row's query image is in each of its pairs:
        the same decoded image, which a family reads once per batch, as the service does)."""

        def side(text: str | None, image: bytes | None, field: str) -> Content:
            if image is None:
                return Content(text=text)
            if image not in decoded:
                decoded[image] = content_from(None, image, self.settings, field)
            return Content(text=text, image=decoded[image].image)

        return Pair(
            side(record["query_text"], record["query_image"], "query"),
            side(record["document_text"], record["document_image"], "document"),
            record["instruction"],
            record["max_tokens_per_doc"],
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch's pair records with their scores or errors (and without what was scored)."""
        records = batch.to_pylist()
        errors = [self.load_error] * len(records)
        raw_scores: list[float | None] = [None] * len(records)
        scores: list[float | None] = [None] * len(records)
        if not self.load_error:
            pairs, at, decoded = [], [], {}
            for i, record in enumerate(records):
                try:
                    pairs.append(self._pair(record, decoded))
                    at.append(i)
                except (RerankError, ValueError) as exc:
                    errors[i] = str(exc)
            for index_list, scored in self._score(pairs, at, errors):
                for i, score in zip(index_list, scored):
                    raw_scores[i], scores[i] = score.raw, score.relevance
        for record, error, raw, score in zip(records, errors, raw_scores, scores):
            record.update(dict.fromkeys(PAIR_INPUTS), error=error, raw=raw, score=score)
        return pa.Table.from_pylist(records, schema=RECORD_SCHEMA)

    def _score(self, pairs: list[Pair], at: list[int], errors: list[str]) -> list[tuple[list[int], list[Score]]]:
        """Score the batch at once; if one pair cannot be scored, find it and score the rest."""
        if not pairs:
            return []
        try:
            return [(at, self._score_windows(pairs))]
        except Exception:  # noqa: BLE001 - whatever failed, find the pair and score the others
            out = []
            for pair, i in zip(pairs, at):
                try:
                    out.append(([i], self._score_windows([pair])))
                except ScoringError as exc:
                    errors[i] = str(exc)
                except Exception as exc:  # noqa: BLE001 - the pair's row fails with the reason, the job goes on
                    log.exception("pair failed to score")
                    errors[i] = f"scoring failed: {type(exc).__name__}: {str(exc)[:300]}"
            return out

    def _score_windows(self, pairs: list[Pair]) -> list[Score]:
        """As a replica scores a call (scoring.call): long documents as the service cuts them, forwards of at most
        the batch cap."""
        return score_call(self.scorer, pairs, self.cap, window_rule(self.settings))


# ---- output: shards committed atomically -------------------------------------------------------


@dataclass
class ShardResult:
    """What has arrived for one shard: row records, and per pair a score or an error."""

    rows: int
    headers: dict[int, dict] = field(default_factory=dict)
    pairs: dict[tuple[int, int], Score | str] = field(default_factory=dict)
    arrived: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # distinct pairs per row

    def add(self, key: tuple[int, int], value: Score | str) -> bool:
        """Record a pair's result; True when it is new (a retried task may deliver it twice)."""
        new = key not in self.pairs
        self.pairs[key] = value
        self.arrived[key[0]] += new
        return new

    def complete(self) -> bool:
        if len(self.headers) < self.rows:
            return False
        return all(h["error"] is not None or self.arrived[row] >= h["n_pairs"] for row, h in self.headers.items())


class Output:
    """OUT/part-NNNNN.{parquet,jsonl} (one row per scored input row), OUT/errors/part-NNNNN.jsonl,
    OUT/summary.json. A part file exists only once its shard is complete."""

    def __init__(self, root: Path, fmt: str) -> None:
        self.root = root
        self.fmt = fmt
        (root / "errors").mkdir(parents=True, exist_ok=True)
        # One run per output at a time. The kernel drops the lock when its holder dies: nothing stale remains.
        self.lock = open(root / ".lock", "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()
            raise SystemExit(
                f"another run is writing to {root}; wait for it to finish, or use another --output"
            ) from None
        for stale in list(root.glob(".tmp-*")) + list((root / "errors").glob(".tmp-*")):
            stale.unlink()  # a shard that was being written when the last run stopped

    def close(self) -> None:
        self.lock.close()

    def committed_ids(self) -> set[str]:
        """The ids of every row committed so far, results and errors (a resumed run must not repeat one)."""
        ids: set[str] = set()
        for path in self.root.glob(f"part-*.{self.fmt}"):
            if self.fmt == "parquet":
                ids.update(pq.read_table(path, columns=["id"]).column("id").to_pylist())
            else:
                ids.update(json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip())
        for path in (self.root / "errors").glob("part-*.jsonl"):
            ids.update(json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip())
        ids.discard("")
        return ids

    def part(self, shard: int) -> Path:
        return self.root / f"part-{shard:05d}.{self.fmt}"

    def committed(self, shard: int) -> bool:
        return self.part(shard).exists()

    def commit(self, shard: int, rows: list[dict], errors: list[dict]) -> None:
        errors_path = self.root / "errors" / f"part-{shard:05d}.jsonl"
        write_atomically(errors_path, "".join(json.dumps(e) + "\n" for e in errors).encode())
        if self.fmt == "parquet":
            tmp = self.root / f".tmp-{shard:05d}.parquet"
            pq.write_table(pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA), tmp)
            fsync(tmp)
            os.replace(tmp, self.part(shard))
            fsync(self.root)
        else:
            write_atomically(self.part(shard), "".join(json.dumps(r) + "\n" for r in rows).encode())

    def count_rows(self) -> tuple[int, int]:
        """(output rows, error rows) over every committed shard."""
        out = 0
        for path in self.root.glob(f"part-*.{self.fmt}"):
            if self.fmt == "parquet":
                out += pq.ParquetFile(path).metadata.num_rows
            else:
                out += sum(1 for line in path.read_text().splitlines() if line.strip())
        errors = sum(
            sum(1 for line in path.read_text().splitlines() if line.strip())
            for path in (self.root / "errors").glob("part-*.jsonl")
        )
        return out, errors


def write_atomically(path: Path, data: bytes) -> None:
    """Write, flush to disk, rename, and flush the rename: a crash leaves the old file or the new, never half."""
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_bytes(data)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(path.parent)


def fsync(path: Path) -> None:
    """Flush a file's (or a folder's: its entries') writes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- the job ---------------------------------------------------------------------------------


@dataclass
class Options:
    input: str
    output: str
    pool: str = "auto"
    model: str | None = None
    top_n: int | None = None
    strategy: str | None = None
    threshold: float | None = None
    instruction_template: str | None = None
    format: str = "parquet"
    shard_rows: int = 256
    text_actors: int = 1
    image_actors: int = 1


def parse_args(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m serve_app.bulk", description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="JSONL or Parquet file, or a folder of them")
    parser.add_argument("--output", required=True, help="output folder (rerun with the same one to resume)")
    parser.add_argument("--pool", choices=["auto", "text", "image_text"], default="auto")
    parser.add_argument("--model", help="served model name or alias for rows that name none (default: by pair kind)")
    parser.add_argument("--top-n", type=int)
    parser.add_argument("--strategy", choices=sorted(STRATEGIES))
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--instruction-template")
    parser.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    parser.add_argument("--shard-rows", type=int, default=256, help="JSONL rows per shard (Parquet: row groups)")
    parser.add_argument("--text-actors", type=int, default=1)
    parser.add_argument("--image-actors", type=int, default=1)
    args = parser.parse_args(argv)
    if args.strategy is not None and args.threshold is not None:
        parser.error("give --strategy or --threshold, not both")
    if args.top_n is not None and args.top_n < 1:
        parser.error("--top-n must be 1 or more (leave it out for every result)")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        parser.error("--threshold is a calibrated score: give one in 0..1")
    for name in ("shard_rows", "text_actors", "image_actors"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    return Options(**vars(args))


def batch_size_for(pool: str, pool_settings: PoolSettings, settings: Settings) -> int:
    """The pool's cap as its replicas pick it (hardware.choose_profile), on the GPU kind the actors will get."""
    import ray

    kind, device = "cpu", "cpu"
    if pool_settings.num_gpus and ray.cluster_resources().get("GPU"):
        kinds = [key.split(":", 1)[1] for key in ray.cluster_resources() if key.startswith("accelerator_type:")]
        kind, device = pool_settings.accelerator_type or (kinds[0] if kinds else "cpu"), "cuda:0"
    rows = hardware.load_profile_rows(settings.batch_profiles_path)
    where = Device(device, node="", gpu_kind=kind, gpu_name=None)
    profile = hardware.choose_profile(rows, where, pool, pool_settings)
    # A kind with no row: its actors derive their cap from the card; they are handed the fallback's batches.
    return profile.overridden(pool_settings.max_batch_size, None).max_batch_size


# What of a pool's settings changes its scores: a resumed job must score with the same (and the same score map).
SCORING_SETTINGS = {"model", "family", "answer_tokens", "dtype", "quantize", "calibration", "score_map"}


def score_map_digest(served: Served) -> str | None:
    """The content of the score map the model's pool would load, hashed: a refitted map is another job."""
    import hashlib

    path = Path(served.settings.score_map or score_map_path(served.name))
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def check_job_file(root: Path, options: Options, shards: list[Shard], settings: Settings) -> None:
    """A rerun must be the same job: same input cut the same way, same options, same models."""
    models = {
        m.name: {
            **m.settings.model_dump(mode="json", include=SCORING_SETTINGS),
            "score_map_sha256": score_map_digest(m),
        }
        for m in Catalog(settings).models
    }
    # How long documents are scored changes their scores too.
    models["long_documents"] = {
        "mode": settings.long_documents,
        "stride": settings.window_stride_tokens,
        "per_document": settings.max_windows_per_document,
    }
    job = {"options": asdict(options), "shards": [asdict(s) for s in shards], "models": models}
    path = root / "_job.json"
    if path.exists():
        earlier = json.loads(path.read_text())
        if earlier != job:
            differ = [part for part in ("options", "shards", "models") if earlier.get(part) != job[part]]
            names = {"options": "options", "shards": "input", "models": "model settings"}
            raise SystemExit(
                f"{root} holds the output of a different job ({', '.join(names[d] for d in differ)} differ: a resumed "
                "job would mix two jobs' scores in one output); use a new --output"
            )
        return
    root.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(job, indent=1).encode())


def run(options: Options, settings: Settings | None = None) -> dict:
    import ray

    settings = settings or Settings()
    started = time.monotonic()
    templates = settings.instruction_templates()
    if options.instruction_template and options.instruction_template not in templates:
        raise SystemExit(f"no instruction template {options.instruction_template!r}; known: {sorted(templates)}")
    if options.model is not None:
        try:
            Catalog(settings).find(options.model)
        except RerankError as exc:
            raise SystemExit(f"--model: {exc.message}") from None

    shards = plan_shards(input_files(Path(options.input)), options.shard_rows)
    out = Output(Path(options.output), options.format)
    try:
        check_job_file(out.root, options, shards, settings)
        todo = [s for s in shards if not out.committed(s.index)]
        rows_total = sum(s.rows for s in shards)
        log.info("%d rows in %d shards; %d shards already committed", rows_total, len(shards), len(shards) - len(todo))
        pairs_scored = 0
        if todo:
            # Before ray.init: a submitted job's driver may find its working directory (where image paths
            # resolve) replaced once it joins the cluster.
            models = models_used(todo, options, settings)
            if not ray.is_initialized():
                ray.init()
            rows_done = rows_total - sum(s.rows for s in todo)
            pairs_scored = score_shards(todo, models, out, options, settings, templates, rows_done)
        rows_out, errors = out.count_rows()
    finally:
        out.close()
    elapsed = time.monotonic() - started
    summary = {
        "rows_in": rows_total,
        "rows_out": rows_out,
        "errors": errors,
        "pairs": pairs_scored,
        "shards": len(shards),
        "shards_resumed": len(shards) - len(todo),
        "elapsed_s": round(elapsed, 2),
        "pairs_per_s": round(pairs_scored / elapsed, 1) if elapsed else None,
    }
    write_atomically(out.root / "summary.json", json.dumps(summary, indent=1).encode())
    log.info("done: %s", summary)
    return summary


def models_used(shards: list[Shard], options: Options, settings: Settings) -> list[Served]:
    """The models the job's pairs go to, each one actor pool: a pass over the rows, each routed as `expand`
    routes it (its `model`, else --model, else the default of its kind of pair). A text-only file starts no
    image-text actor (nor takes its GPU); a row that cannot be read or routed starts none (it is an error row)."""
    catalog, templates = Catalog(settings), settings.instruction_templates()
    names: set[str] = set()
    started = last_log = time.monotonic()
    rows_total, rows_done = sum(s.rows for s in shards), 0
    for shard in shards:
        if time.monotonic() - last_log > PROGRESS_EVERY_S:  # a large file takes a while: say how far it is
            last_log = time.monotonic()
            log.info("routing rows %d/%d to their models", rows_done, rows_total)
        rows_done += shard.rows
        for row in read_shard(shard):
            try:
                names.update(parse_row(row, options, settings, templates, check_images=False).models)
            except Exception:  # noqa: BLE001 - as in expand: the row becomes an error row there
                continue
    log.info("rows routed to %s in %.1f s", sorted(names) or "no model", time.monotonic() - started)
    return [m for m in catalog.models if m.name in names]


def scoring_dataset(
    todo: list[Shard], models: list[Served], options: Options, settings: Settings, templates: dict[str, str]
):
    """The job's Ray Data dataset: each shard's rows (their headers and error rows), and per model its pairs
    scored by an actor pool of that model's scorer."""
    import ray

    # One block per shard: shards stream through and commit one by one instead of in a few large lumps.
    items = ray.data.from_items([asdict(s) for s in todo], override_num_blocks=len(todo))

    def records(branch: str):
        kwargs = {"branch": branch, "options": options, "settings": settings, "templates": templates}
        compute = ray.data.TaskPoolStrategy(size=EXPAND_TASKS)
        return items.map_batches(
            expand_shards, batch_size=1, batch_format="pyarrow", fn_kwargs=kwargs, num_cpus=EXPAND_CPUS, compute=compute
        )

    datasets = [records("rows")]
    has_gpus = bool(ray.cluster_resources().get("GPU", 0))
    actors = {"text": options.text_actors, "image_text": options.image_actors}  # actor pool size per modality
    for served in models:
        pool_settings = served.settings
        # Ray Data restarts a lost actor and retries its batch (max_restarts / max_task_retries -1 by default).
        datasets.append(
            records(served.name).map_batches(
                PairScorer,
                fn_constructor_kwargs={"model": served.name, "settings": settings},
                batch_size=batch_size_for(served.modality, pool_settings, settings),
                batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=actors[served.modality]),
                num_cpus=pool_settings.num_cpus,
                num_gpus=pool_settings.num_gpus if has_gpus else 0,
            )
        )
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]  # every row an error row


def score_shards(
    todo: list[Shard],
    models: list[Served],
    out: Output,
    options: Options,
    settings: Settings,
    templates: dict[str, str],
    rows_done: int,
) -> int:
    """Score every shard of `todo` and commit each as soon as all its pairs are in; returns the pairs scored."""
    rows_total = rows_done + sum(s.rows for s in todo)
    dataset = scoring_dataset(todo, models, options, settings, templates)
    pending = {s.index: ShardResult(s.rows) for s in todo}
    seen_ids = out.committed_ids()
    pairs_scored, last_log, started = 0, time.monotonic(), time.monotonic()
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        for record in batch.to_pylist():
            result = pending.get(record["shard"])
            if result is None:
                continue  # its shard is already committed (a retried task's duplicate)
            if record["kind"] == "row":
                result.headers[record["row"]] = record
                continue
            key = (record["row"], record["doc"])
            error = record["error"]
            pairs_scored += result.add(key, error if error is not None else Score(record["raw"], record["score"]))
        for shard_index in [i for i, r in pending.items() if r.complete()]:
            rows_done += commit_shard(out, shard_index, pending.pop(shard_index), seen_ids)
        if time.monotonic() - last_log > PROGRESS_EVERY_S:
            last_log = time.monotonic()
            rate = pairs_scored / (last_log - started)
            row_rate = rows_done / (last_log - started)
            eta = (rows_total - rows_done) / row_rate if row_rate else float("nan")
            log.info("rows %d/%d, %.1f pairs/s, ETA %.0f s", rows_done, rows_total, rate, eta)
    if pending:
        raise RuntimeError(f"shards {sorted(pending)} did not receive all their pairs; rerun to resume")
    return pairs_scored


def commit_shard(out: Output, shard: int, result: ShardResult, seen_ids: set[str]) -> int:
    """Write a complete shard: each row ranked with its own top_n and threshold, or its error. An id seen in a
    row committed earlier makes this row an error: one id, one result."""
    rows, errors = [], []
    for row in sorted(result.headers):
        header = result.headers[row]
        scores = [result.pairs[(row, doc)] for doc in range(header["n_pairs"])] if header["error"] is None else []
        error = header["error"] or next(
            (f"documents[{doc}]: {s}" for doc, s in enumerate(scores) if isinstance(s, str)), ""
        )
        if header["id"] and header["id"] in seen_ids:
            error = f"duplicate id {header['id']!r}: an earlier row has it; give every row its own id"
        elif header["id"]:
            seen_ids.add(header["id"])
        if error:
            errors.append({"id": header["id"], "row": row, "shard": shard, "error": error})
            continue
        threshold = header["threshold"]
        if header["thresholds"] is not None:  # a strategy, resolved per document by the model that scored it
            threshold = [Threshold(*t) for t in zip(header["thresholds"], header["thresholds_inclusive"])]
        elif threshold is not None:
            threshold = Threshold(threshold, header["threshold_inclusive"])
        ranked = rank(scores, threshold, header["top_n"])
        rows.append(
            {
                "id": header["id"],
                "results": [
                    {"index": s.index, "relevance_score": s.relevance_score, "raw_score": s.raw_score} for s in ranked
                ],
            }
        )
    out.commit(shard, rows, errors)
    return len(result.headers)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
