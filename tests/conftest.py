"""Session fixtures: tiny random-weight models built from configs, and one Ray + Serve for all tests."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

# Before transformers is imported (it reads these once): no hub here, so fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Serve's controller gives a new proxy 3 readiness checks of 5 s, then kills it: seen beside one busy process, the
# session's proxy not started after 17 s (its worker process still starting), killed, and serve.start failing with
# ActorDiedError. The controller (started by this process's cluster) reads this from the environment.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "20")

from serve_app.local_ray import quiet_ray_env  # noqa: E402
from serve_app.ports import free_port  # noqa: E402
from tests import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "cross_encoder": tiny_models.build_cross_encoder(root / "cross_encoder", num_labels=1),
        "cross_encoder_2": tiny_models.build_cross_encoder(root / "cross_encoder_2", num_labels=2, seed=1),
        "embedding": tiny_models.build_embedding(root / "embedding"),
        "clip": tiny_models.build_clip(root / "clip"),
        "blip": tiny_models.build_blip(root / "blip"),
        "slow": tiny_models.build_slow_cross_encoder(root / "slow"),
        "qwen3": tiny_models.build_qwen3_reranker(root / "qwen3"),
        "qwen2_vl": tiny_models.build_qwen2_vl_reranker(root / "qwen2_vl"),
    }


# The guarded application's keys: the current one and the one clients rotate to.
GUARDED_KEYS = ("guarded-key-0123456789", "rotated-key-0123456789")

# What one more forward pass costs a MiniLM-L6-sized model on these CPUs, in padded tokens (measured: 25). Given
# to the pools of such models that no test measures, since each measurement (at start-up and three times more
# when idle) costs seconds of CPU that a 2-core machine takes from every other test; tests/test_forward_cost.py
# measures it on the remeasure application.
MINILM_FORWARD_COST_TOKENS = 25

# Worker nodes that declare GPUs they do not have: GPU pinning and batch sizing are tested on CPUs.
GPU_NODES = {"A10G": 4, "RTX3060": 4, "B200": 4}


# ---- the session's applications live only as long as their readers ------------------------------------------

# Fixtures that deploy applications shared by several modules, and the applications each one deploys (set when it
# does). Each idle replica costs ~1% of a core of Ray's and Serve's loops: the session's 18 replicas idling through
# the ~500 s of modules that never read them were an estimated ~90 core-seconds of a 2-core run.
SESSION_APPS: dict[str, list[str]] = {"apps": [], "spread": []}
LAST_READER: dict[str, str] = {}  # fixture -> the node id of the last test that reads it (set at collection)


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: the last reader among the tests that run
def pytest_collection_modifyitems(config, items) -> None:
    """Modules that read a session application run first (in their usual order), then the others (in theirs); a
    session application is deleted after the last test that reads it (pytest_runtest_teardown)."""
    module = {item: item.nodeid.partition("::")[0] for item in items}
    readers = {module[item] for item in items if set(getattr(item, "fixturenames", ())) & SESSION_APPS.keys()}
    first = {name: i for i, name in enumerate(dict.fromkeys(module.values()))}
    items.sort(key=lambda item: (module[item] not in readers, first[module[item]]))  # stable: a module's own order
    LAST_READER.clear()
    for item in items:
        for fixture in SESSION_APPS.keys() & set(getattr(item, "fixturenames", ())):
            LAST_READER[fixture] = item.nodeid


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last reader's teardown. Not after the last test of the run: the session's own teardown has then
    stopped the cluster, Serve with it."""
    try:
        return (yield)
    finally:
        for fixture, reader in LAST_READER.items():
            if reader == item.nodeid:
                if nextitem is not None:
                    for name in SESSION_APPS[fixture]:
                        undeploy(name)
                SESSION_APPS[fixture].clear()


@pytest.fixture(scope="session")
def cluster() -> Iterator:
    """One Ray cluster for the whole session: a CPU head and three declared-GPU nodes, all local."""
    import ray
    from ray.cluster_utils import Cluster

    # Ray's loops slowed as `make run` slows them (serve_app/local_ray.py): measured idle with the session's
    # applications deployed, the cluster took 0.55-0.76 of the 2 cores without it. No log monitor either: the
    # driver reads no worker's log (log_to_driver=False), and it tails every worker's files.
    quiet_ray_env()
    # The head runs the dashboard: its job server takes the bulk jobs, its state API finds actors.
    local = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 16,
            "include_dashboard": True,
            "dashboard_port": free_port(),
            "include_log_monitor": False,
        },
    )
    for kind, cpus in GPU_NODES.items():
        local.add_node(num_cpus=cpus, num_gpus=1, resources={f"accelerator_type:{kind}": 1})
    context = ray.init(address=local.address, log_to_driver=False)
    local.wait_for_nodes()
    local.dashboard_url = f"http://{context.dashboard_url}"
    # The port was free when chosen, not when bound: another Ray on this machine (a second test run) may have
    # taken it, and this session's jobs would then run on that cluster. Fail here, by name, if so.
    session = ray._private.worker.global_worker.node.session_name
    answered = httpx.get(f"{local.dashboard_url}/api/version", timeout=60).json()["session_name"]
    assert answered == session, f"the dashboard at {local.dashboard_url} is another Ray's ({answered}), not {session}"
    yield local
    ray.shutdown()
    local.shutdown()


@pytest.fixture(scope="session")
def serve_url(cluster) -> str:
    """One Serve HTTP proxy on 127.0.0.1 for the whole session. Not shut down at the end: `cluster` then stops every
    process of the cluster, Serve's too, at once (serve.shutdown first waited 7.5 s for each replica's graceful
    stop)."""
    from ray import serve

    port = free_port()
    # One proxy, on the head: the declared-GPU nodes share this machine, and a proxy each would only cost CPU.
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    return f"http://127.0.0.1:{port}"


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line (a Ray worker's: its title, e.g. ray::MapWorker(...)) contains `text`
    (zombies have none); a scan of /proc, which no load on the cluster can slow down as Ray's state API can."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue  # gone meanwhile
    return found


def node_with(kind: str) -> str:
    import ray

    (node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and f"accelerator_type:{kind}" in n["Resources"]]
    return node


def deploy(name: str, args: dict) -> None:
    deploy_all({name: args})


def undeploy(name: str) -> None:
    """Delete an application without waiting for its replicas to stop: Serve's blocking delete waits out their
    graceful shutdown (about 3 s each, the machine idle meanwhile). Safe because no test reuses an application's
    name or reads another application's replicas."""
    from ray import serve

    serve.delete(name, _blocking=False)


def deploy_all(specs: dict[str, dict], root: str | None = None) -> None:
    """Deploy applications at once (their replicas load side by side) and wait until every one runs; each at
    /<name>, `root` at /."""
    from ray import serve

    from serve_app.app import build_app

    serve.run_many(
        [
            serve.RunTarget(build_app(args), name=name, route_prefix="/" if name == root else f"/{name}")
            for name, args in specs.items()
        ]
    )


@pytest.fixture(scope="session")
def apps(serve_url, model_dirs, tmp_path_factory) -> dict[str, str]:
    """The session's applications, deployed side by side: each an ingress with a text and (most) an image-text
    pool. Those one module alone reads are in module_specs."""
    specs = {
        # Tiny cross-encoder and CLIP, at the root path (as `make run` serves: tests/test_clients.py's libraries
        # need it), the text model answering to "ranker" too.
        "alpha": {
            "text": {"model": str(model_dirs["cross_encoder"]), "aliases": ["ranker"]},
            "image_text": {"model": str(model_dirs["clip"])},
        },
        # The real default text model (packaged, unpacked into a fresh cache) and tiny BLIP.
        "beta": {
            "text": {"max_batch_size": 8, "forward_cost_tokens": MINILM_FORWARD_COST_TOKENS},
            "image_text": {"model": str(model_dirs["blip"])},
            "model_cache_dir": str(tmp_path_factory.mktemp("model_cache")),
        },
        # Small limits, an API key, and an image-text model that cannot load.
        "guarded": {
            # Pinned to a GPU kind the profile table has no row for.
            "text": {"model": str(model_dirs["cross_encoder_2"]), "num_gpus": 0.5, "accelerator_type": "B200"},
            # load_retry_s unset: no replacement every few minutes (tests/test_faults.py covers the retry).
            "image_text": {"model": str(tmp_path_factory.mktemp("empty") / "no-such-model"), "load_retry_s": None},
            "api_key": ",".join(GUARDED_KEYS),
            "max_documents_per_request": 5,
            "max_text_chars": 200,
            "max_request_bytes": 4096,
            "max_image_bytes": 2048,
            "request_read_timeout_s": 2,
        },
        # Pools pinned to declared GPU kinds, batch caps from the profile table, a realtime variant.
        "pinned": {
            "text": {
                "model": str(model_dirs["cross_encoder"]),
                "num_gpus": 0.5,
                "accelerator_type": "A10G",
                "realtime_replicas": 1,
            },
            "image_text": {"model": str(model_dirs["clip"]), "num_gpus": 0.5, "accelerator_type": "RTX3060"},
        },
        # A text replica that no test but tests/test_forward_cost.py calls: its idle re-measurements of the
        # forward cost, started by one call right after start-up, are not interrupted by other tests' calls.
        "remeasure": {
            "text": {"model": str(model_dirs["cross_encoder"]), "num_cpus": 0.25},
            "image_text": {"enabled": False},
        },
    }
    deploy_all(specs, root="alpha")
    SESSION_APPS["apps"].extend(specs)
    urls = {name: serve_url if name == "alpha" else f"{serve_url}/{name}" for name in specs}
    # The remeasuring replica's first call, made now: its measurements then run 1, 5 and 15 s from here while
    # other tests run, and tests/test_forward_cost.py reads them later instead of waiting 21 s for them.
    replicas = httpx.get(f"{urls['remeasure']}/v1/models", timeout=60).json()["pools"]["text"]["replicas"]
    REMEASURE_BEFORE_FIRST_CALL.extend(replicas)
    first = {"query": "capital?", "documents": ["paris"]}
    answer = httpx.post(f"{urls['remeasure']}/v2/rerank", json=first, timeout=60)
    assert answer.status_code == 200, answer.text
    # The pinned text replica's first figures, made now: Ray exports a worker's metrics every 10 s, and
    # tests/test_gpu_pinning.py's Prometheus check then finds them exported instead of waiting for the next export.
    assert httpx.post(f"{urls['pinned']}/v2/rerank", json=first, timeout=60).status_code == 200
    assert httpx.get(f"{urls['pinned']}/v1/stats", timeout=60).status_code == 200  # sets the memory gauge
    return urls


def module_specs(model_dirs) -> dict[str, dict]:
    """Applications that one test module alone reads: deployed for that module and deleted after it, so that
    their replicas do not idle (each costs ~1% of a core of Ray's and Serve's loops) through the rest of the
    run."""
    return {
        # Yes/no rerankers in both pools: a Qwen3 causal LM for text, a Qwen2-VL for image pairs.
        "yes_no": {
            "text": {"model": str(model_dirs["qwen3"])},
            "image_text": {"model": str(model_dirs["qwen2_vl"])},
        },
        # A slow model behind small queues and a short deadline: overload and timeout behaviour.
        "tight": {
            "text": {
                "model": str(model_dirs["slow"]),
                "forward_cost_tokens": MINILM_FORWARD_COST_TOKENS,
                "max_batch_size": 4,
                "max_ongoing_requests": 1,
                "max_queued_requests": 1,
            },
            "image_text": {"enabled": False},
            "ingress": {"max_ongoing_requests": 4, "max_queued_requests": 2},
            # Twice the 503s' bound in test_overload: a refusal at once stays apart from a wait for the deadline
            # even on a loaded machine (at 3 s with a 2.5 s bound, one CI run's 503 took 2.502 s).
            "request_timeout_s": 6,
            "retry_after_s": 2,
            "admission_wait_fraction": None,  # every call queues: the deadline (504) and cancellation paths
        },
        # The slow model behind a short deadline and roomy queues: admission by estimated wait (fast 503s).
        "admitting": {
            "text": {
                "model": str(model_dirs["slow"]),
                "max_batch_size": 8,
                "forward_cost_tokens": MINILM_FORWARD_COST_TOKENS,
            },
            "image_text": {"enabled": False},
            "request_timeout_s": 4,
            # Below the default (0.9), for room: the rate is measured quietly, but under the spike test's burst
            # the proxy and the ingress (tokenizing ten requests at once) share the machine's 2 cores with the
            # replica beside CI's other load, and the replica's measured rate drops with it. At 0.6 with requests
            # of 25%, two admitted requests took over 4 s (a 504 in a busy CI run); at 0.4, the rate measured in
            # the burst was so low that a 25% request alone no longer fitted after it (a 503: a drained queue now
            # admits any call). At 0.5 with requests of 20%, a 504 takes a 2.5x slowdown.
            "admission_wait_fraction": 0.5,
            "max_pairs_per_call": 1000,  # one replica, one call per request: a request's size is its call's
        },
    }


@contextlib.contextmanager
def module_apps(specs: dict[str, dict], serve_url: str) -> Iterator[dict[str, str]]:
    """Deploy a module's applications at once and delete them after it; their URLs by name. Deployed together,
    their replicas start side by side: three one-replica applications took 16.8 s at once and 27.5 s one after
    another on the quiet 2-core machine (each start is mostly one process importing torch, on one core)."""
    deploy_all(specs)
    try:
        yield {name: f"{serve_url}/{name}" for name in specs}
    finally:
        for name in specs:
            undeploy(name)


def module_app(name: str, model_dirs, serve_url: str) -> Iterator[httpx.Client]:
    with module_apps({name: module_specs(model_dirs)[name]}, serve_url) as urls:
        with httpx.Client(base_url=urls[name], timeout=60) as http:
            yield http


# The remeasure application's replicas as /v1/models showed them before their first call (set by `apps`).
REMEASURE_BEFORE_FIRST_CALL: list[dict] = []


@pytest.fixture(scope="session")
def alpha(apps) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=apps["alpha"], timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def beta(apps) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=apps["beta"], timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def pinned(apps) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=apps["pinned"], timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def yes_no(serve_url, model_dirs) -> Iterator[httpx.Client]:
    yield from module_app("yes_no", model_dirs, serve_url)


@pytest.fixture(scope="session")
def spread(serve_url, model_dirs) -> Iterator[httpx.Client]:
    """Two text replicas that tokenize in their pool: one request's calls land on both (tests/test_routing.py), and
    its text is tokenized there (tests/test_tokenize.py). Deployed on first use, deleted after its last reader."""
    deploy(
        "spread",
        {
            "text": {"model": str(model_dirs["cross_encoder"]), "num_replicas": 2, "num_cpus": 0.25},
            "image_text": {"enabled": False},
            "tokenize_in": "pool",
        },
    )
    SESSION_APPS["spread"].append("spread")
    with httpx.Client(base_url=f"{serve_url}/spread", timeout=60) as client:
        yield client


@pytest.fixture(scope="session")
def guarded(apps) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=apps["guarded"], timeout=60, headers={"X-API-Key": GUARDED_KEYS[0]}) as client:
        yield client


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    """An RGB image of seeded noise: distinct images give distinct scores, even from random models."""
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---- one in-process bulk job, read by the bulk tests ------------------------------------------------------

GOOD_ROW = {"query": "capital of france", "documents": ["paris", "a red car"]}


@dataclass(frozen=True)
class BulkJob:
    lines: list[bytes]  # the input file's lines, in order
    rows: dict[str, dict]  # the rows with an id, by id
    options: object  # serve_app.bulk.Options
    summary: dict
    shard_rows: int

    @property
    def out(self) -> Path:
        return Path(self.options.output)


def bulk_job_lines() -> list[bytes]:
    """Rows for every bulk test that reads one job's output, each group named by the test that reads it."""
    image = b64(noise_image((24, 24), 3))
    rows = [
        # test_bulk_scores_equal_the_services: a text row and one with an image document.
        {"id": "a", "query": "what is the capital of france", "documents": ["paris is the capital", "a red car"]},
        {"id": "b", "query": "a red photo", "documents": [{"image": image}, "the dog", "berlin is a city"]},
        # test_a_rows_own_top_n_and_threshold_rank_its_results (the job's --top-n is 2).
        {"id": "own", "query": "q", "documents": ["a", "b", "c"], "top_n": 1},
        {"id": "job", "query": "q", "documents": ["a", "b", "c"]},
        {"id": "none_kept", "query": "q", "documents": ["a", "b"], "threshold": 1.0},
        # test_a_duplicate_id_is_an_error_row_not_a_second_result: "same" twice, in two shards.
        {"id": "same", **GOOD_ROW},
        {"id": "other", **GOOD_ROW},
        {"id": "same", **GOOD_ROW},
    ]
    # test_rows_that_cannot_be_read_become_error_rows_and_the_job_finishes.
    hostile = [
        b'{"id": "bad-utf8", "query": "caf\xe9", "documents": ["a"]}',  # Latin-1, not UTF-8 (no readable id)
        b'{"id": "deep", "query": "q", "documents": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        json.dumps({"id": "text-not-a-string", "query": "q", "documents": [{"text": 5}]}).encode(),
        json.dumps({"id": "image-not-a-string", "query": "q", "documents": [{"image": ["x"]}]}).encode(),
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"id": "good-2", **GOOD_ROW}).encode(),
    ]
    return [json.dumps(r).encode() for r in rows] + hostile


@pytest.fixture(scope="session")
def bulk_job(cluster, model_dirs, tmp_path_factory) -> BulkJob:
    """One bulk job run in process (each run starts its own Ray Data actors: ~10 s), with the rows of
    bulk_job_lines, the tiny cross-encoder and CLIP (alpha's models), --top-n 2, three rows a shard."""
    from serve_app.bulk import Options, run

    root = tmp_path_factory.mktemp("bulk_job")
    lines = bulk_job_lines()
    (root / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    options = Options(input=str(root / "in.jsonl"), output=str(root / "out"), top_n=2, shard_rows=3)
    summary = run(options, bulk_settings(model_dirs))
    rows = {}
    for line in lines:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # the rows that are not JSON this service reads
            continue
        if isinstance(row, dict):
            rows.setdefault(row["id"], row)
    return BulkJob(lines, rows, options, summary, shard_rows=3)


def bulk_settings(model_dirs, text: str = "cross_encoder"):
    from serve_app.settings import Settings

    return Settings(text={"model": str(model_dirs[text])}, image_text={"model": str(model_dirs["clip"])})
