"""Ray's own tools against a real `ray start --head` with token authentication, run as docs/operations.md writes them.

The "Ray's own tools" block is read from docs/operations.md and each line run as a subprocess in one
environment (its `source` and `export` lines set that environment). Three things differ from a user's
shell, each so that the test cannot disturb the session's cluster or the machine:
- HOME is a temporary directory, so the token lands there (`~/.ray/auth_token`), not in the real home;
- `ray start --head` gets its own ports and temporary directory, and `--block`: the test stops that head
  itself, because the block's `ray stop` would stop every Ray process on the machine, the session's too;
- the bulk job and `serve deploy` start at once (the job's scoring actors start beside the service's replicas);
- the bulk job's output directory is a temporary one; HF_HUB_OFFLINE=1 (no hub here).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from serve_app import pages
from serve_app.ports import free_port, port_free
from tests.conftest import processes_naming

ROOT = Path(__file__).resolve().parent.parent
BASH_BLOCK = re.compile(r"```bash\n(.*?)```", re.DOTALL)
OUTPUT = "/tmp/rerank-out"
SERVE_URL = "http://127.0.0.1:8000"  # deploy/serve_config.yaml's http_options, the README's curl
STATUS_EVERY_S = 15


def readme_commands() -> list[str]:
    """The block's commands: comments dropped, backslash continuations joined."""
    (block,) = BASH_BLOCK.findall(pages.block("ray-tools"))  # docs/operations.md
    commands, pending = [], ""
    for line in block.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).rstrip()  # a trailing comment ("  # ...")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append((pending + line).strip())
        pending = ""
    return commands


class Head:
    """`ray start --head` as the docs write it, on ports and a temporary directory of its own."""

    def __init__(self, command: str, env: dict[str, str], temp_dir: Path, log: Path) -> None:
        self.dashboard_port = free_port()
        ports = {
            "--port": free_port(),
            "--dashboard-port": self.dashboard_port,
            "--ray-client-server-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
        }
        extra = " ".join(f"{flag}={port}" for flag, port in ports.items())
        # 8 CPUs: the service (3 CPUs) and the bulk job's scoring actors (1.5) run side by side.
        self.command = f"{command} {extra} --temp-dir={temp_dir} --num-cpus=8 --disable-usage-stats --block"
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            ["bash", "-c", self.command], env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.temp_dir = temp_dir

    def wait_until_up(self, timeout_s: float = 120) -> None:
        """The dashboard answers (401 without a token: it is up, and it asks for one)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, Path(self.log.name).read_text()[-3000:]
            try:
                httpx.get(f"{self.address}/api/version", timeout=2)
                return
            except httpx.HTTPError:
                time.sleep(1)
        raise AssertionError(f"the head's dashboard did not come up:\n{Path(self.log.name).read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGKILL to the head's process group (a graceful `--block` stop took 34 s here, and nothing of this head
        outlives the module: its temporary directory goes too), then to any process of this head that left the
        group (its command line names the head's temporary directory)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)
        deadline = time.monotonic() + 30
        while pids := processes_naming(str(self.temp_dir)):
            assert time.monotonic() < deadline, f"processes of the stopped head still run: {pids}"
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        self.log.close()


@pytest.fixture(scope="module")
def session() -> Iterator[dict]:
    """The block's environment and a started head; the head is stopped at the end."""
    if not port_free("127.0.0.1", 8000):
        pytest.fail("port 8000 is taken: deploy/serve_config.yaml serves there; stop what listens on it")
    home = Path(tempfile.mkdtemp(prefix="rt-home-"))
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "RERANK_"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    commands = readme_commands()
    head, rest = None, []
    for command in commands:
        if command.startswith("source "):
            venv_bin = Path(ROOT, command.split()[1]).parent  # `source .venv/bin/activate`
            assert venv_bin.resolve() == Path(sys.executable).parent.resolve() or venv_bin.exists()
            env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
            env["VIRTUAL_ENV"] = str(Path(sys.executable).parent.parent)
        elif command.startswith("export "):
            name, _, value = command.removeprefix("export ").partition("=")
            env[name] = value
        elif command == "ray start --head":
            head = Head(command, env, temp_dir, home / "head.log")
        elif head is None:
            run(command, env)  # before the head: e.g. the token
        else:
            rest.append(command)
    assert head is not None, "the block starts a head with `ray start --head`"
    try:
        head.wait_until_up()
        # The block's CLIs talk to the default dashboard address; this head has its own port.
        env.update(RAY_API_SERVER_ADDRESS=head.address, RAY_DASHBOARD_ADDRESS=head.address)
        yield {"env": env, "commands": rest, "head": head, "home": home}
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


def run(command: str, env: dict[str, str], timeout_s: float = 600) -> subprocess.CompletedProcess:
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(
            ["bash", "-c", command], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s
        )
        # The head's job agent comes up after its dashboard, later on a loaded machine (seen in a CI-like run).
        if "No available agent" not in done.stderr + done.stdout or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def serving(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/live", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def the(commands: list[str], prefix: str) -> str:
    (found,) = [c for c in commands if c.startswith(prefix)]
    return found


def test_the_readme_block_is_what_this_test_runs(session):
    commands = session["commands"]
    assert [c.split()[0] + " " + c.split()[1] for c in commands] == [
        "ray job",
        "serve deploy",
        "serve status",
        "curl -s",
        "serve shutdown",
        "ray stop",
    ]
    token = session["home"] / ".ray" / "auth_token"  # `ray get-auth-token --generate`
    assert token.stat().st_size > 0 and token.stat().st_mode & 0o077 == 0  # readable by its owner alone


@pytest.fixture(scope="module")
def launched(session, tmp_path_factory) -> Iterator[dict]:
    """The block's bulk job and `serve deploy`, started at once: the job scores while the service's replicas
    start (each is seconds of one core importing torch; side by side they use both of a 2-core machine's)."""
    command = the(session["commands"], "ray job submit")
    assert OUTPUT in command
    out = tmp_path_factory.mktemp("rt-out") / "out"
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(run, command.replace(OUTPUT, str(out)), session["env"])
        run(the(session["commands"], "serve deploy"), session["env"])
        yield {"job": job, "out": out}


def test_bulk_job_submitted_with_the_token_writes_every_id_once(launched):
    launched["job"].result()  # `run` asserts that it exited 0
    out = launched["out"]
    rows = [json.loads(line) for p in sorted(out.glob("part-*.jsonl")) for line in p.open()]
    errors = [json.loads(line) for p in sorted((out / "errors").glob("part-*.jsonl")) for line in p.open()]
    ids = [json.loads(line)["id"] for line in (ROOT / "examples" / "bulk" / "queries.jsonl").open() if line.strip()]
    assert sorted([r["id"] for r in rows] + [e["id"] for e in errors]) == sorted(ids)
    assert {r["id"] for r in rows} >= {"q1", "q2"}
    empty = next(e for e in errors if e["id"] == "q4")
    assert "query is empty" in empty["error"]  # as the HTTP API says it


def test_serve_deploy_status_rerank_and_shutdown_with_the_token(session, launched):
    env, commands = session["env"], session["commands"]
    # Until Serve's HTTP answers, asked of the port itself: each `serve status` is a CLI start (about 2 s of CPU,
    # which a 2-core machine takes from the deployment it waits for); it is run every STATUS_EVERY_S meanwhile,
    # to fail at once on DEPLOY_FAILED, then until it reads RUNNING.
    deadline, last_status = time.monotonic() + 300, time.monotonic()
    while not serving(SERVE_URL):
        assert time.monotonic() < deadline, run(the(commands, "serve status"), env).stdout
        if time.monotonic() - last_status > STATUS_EVERY_S:
            last_status = time.monotonic()
            assert "DEPLOY_FAILED" not in (status := run(the(commands, "serve status"), env).stdout), status
        time.sleep(0.5)
    while True:
        status = run(the(commands, "serve status"), env).stdout
        if re.search(r"reranker:\s*\n\s*status: RUNNING", status):
            break
        assert "DEPLOY_FAILED" not in status and time.monotonic() < deadline, status
        time.sleep(3)
    answer = json.loads(run(the(commands, "curl -s"), env).stdout)
    assert [r["index"] for r in answer["results"]][0] == 0  # Paris first: the default model's real weights
    run(the(commands, "serve shutdown"), env)
    assert "reranker" not in run(the(commands, "serve status"), env).stdout


def test_a_client_without_the_token_is_refused(session):
    no_mode = {k: v for k, v in session["env"].items() if k != "RAY_AUTH_MODE"}
    refused = subprocess.run(["serve", "status"], env=no_mode, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "authentication" in (refused.stdout + refused.stderr).lower()
    wrong = {**session["env"], "RAY_AUTH_TOKEN": "not-the-token"}
    command = shlex.split("ray job list")
    refused = subprocess.run(command, env=wrong, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "unauthorized" in (refused.stdout + refused.stderr).lower() or "authentication" in refused.stderr.lower()
    # The dashboard's HTTP API too.
    assert httpx.get(f"{session['head'].address}/api/jobs/", timeout=10).status_code in (401, 403)
