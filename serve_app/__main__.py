"""`python -m serve_app` (what `make run` starts): a local Ray, the application, and a clean Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from serve_app.local_ray import quiet_ray_env
from serve_app.ports import port_free
from serve_app.schemas import describe_errors
from serve_app.settings import Settings

PID_FILE = Path(".run/serve_app.pid")
log = logging.getLogger("serve_app")


def process_identity(pid: int) -> str | None:
    """What tells a process apart from a later one with its pid: its pid namespace and its start time (clock
    ticks since boot). None where /proc does not say (the process is gone, or not Linux)."""
    try:
        namespace = os.readlink(f"/proc/{pid}/ns/pid")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime) counts from the field after the command name, which may hold spaces.
    start = stat[stat.rindex(")") + 2 :].split()[19]
    return f"{namespace} {start}"


def running_pid() -> int | None:
    """The pid of a live earlier `make run`, or None. A pid file left by a killed run is ignored: its pid may
    now be this very process (pids repeat in a restarted container) or an unrelated one, which its recorded
    identity (pid namespace, start time) tells apart."""
    try:
        pid_text, _, identity = PID_FILE.read_text().strip().partition(" ")
        pid = int(pid_text)
    except (FileNotFoundError, ValueError):
        return None
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    if identity and process_identity(pid) not in (None, identity):
        return None  # the pid was reused by a later process, or names one in another pid namespace
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists() and b"serve_app" not in cmdline.read_bytes():
        return None  # the pid was reused by an unrelated process
    return pid


def write_pid_file() -> None:
    PID_FILE.parent.mkdir(exist_ok=True)
    PID_FILE.write_text(f"{os.getpid()} {process_identity(os.getpid()) or ''}".strip())


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        message, _ = describe_errors(exc.errors())
        print(f"serve_app: bad settings, not starting: {message}")
        return 2
    except SettingsError as exc:  # a RERANK_ variable that is not JSON where JSON is expected (models, pools)
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        print(
            f"serve_app: bad settings, not starting: {exc}{cause}. Complex settings (models, text, image_text, "
            "shared_pool, autoscaling) take JSON in their RERANK_ variable; unset the variable for the default."
        )
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(message)s")
    url = f"http://{settings.host}:{settings.port}"
    pid = running_pid()
    if pid is not None:
        print(
            f"serve_app is already running (pid {pid}) at {url}; stop it with Ctrl-C in its terminal or `kill {pid}`."
        )
        return 1
    if not port_free(settings.host, settings.port):
        print(f"port {settings.port} on {settings.host} is taken by another program; free it or set RERANK_PORT.")
        return 1
    write_pid_file()
    try:
        return serve_until_interrupted(settings, url)
    finally:
        PID_FILE.unlink(missing_ok=True)


def serve_until_interrupted(settings: Settings, url: str) -> int:
    import ray
    from ray import serve

    from serve_app.app import build_app

    print("starting a local Ray instance and loading the models (about a minute on 2 cores) ...", flush=True)
    keep_token_auth_default()
    # A Ray of its own ("local": never another cluster found on this machine). Its dashboard serves Ray's own
    # tools (serve status, ray job submit) on localhost only.
    if settings.quiet_ray:
        quiet_ray_env()
    context = ray.init(
        address="local", include_dashboard=True, dashboard_host="127.0.0.1", logging_level=logging.WARNING
    )
    protect_token()
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(build_app(), name="reranker", route_prefix="/")
        print(
            f"\nreranker listening on {url}  (OpenAPI: {url}/docs, health: {url}/health, pools: {url}/v1/models)\n"
            f"try:\n  curl -s {url}/v2/rerank -H 'Content-Type: application/json' -d "
            """'{"query": "What is the capital of France?", "documents": ["Paris is the capital and largest """
            """city of France.", "The Eiffel Tower was finished in 1889.", "Bananas are rich in potassium."]}'\n"""
            "Ctrl-C stops it.",
            flush=True,
        )
        print(ray_tools_hint(context.dashboard_url), flush=True)
        stop.wait()
        print("stopping ...", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def keep_token_auth_default() -> None:
    """An empty RAY_AUTH_MODE (what an unset variable in a compose file or a Kubernetes secret gives) would turn
    Ray's token authentication off without a word: treat it as unset, so Ray's default (on) holds. An explicit
    RAY_AUTH_MODE=disabled is a choice, and is kept (the start-up message says it is off)."""
    if "RAY_AUTH_MODE" in os.environ and not os.environ["RAY_AUTH_MODE"].strip():
        log.warning("RAY_AUTH_MODE is set but empty: ignoring it, so Ray's token authentication stays on")
        del os.environ["RAY_AUTH_MODE"]


def protect_token() -> None:
    """Ray writes the token it creates (~/.ray/auth_token) readable by every user of the machine: only its
    owner needs to read it."""
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file() and path.stat().st_mode & 0o077:
        path.chmod(0o600)


def ray_tools_hint(dashboard_url: str | None) -> str:
    """How to reach this Ray cluster with Ray's CLIs, with or without its token authentication."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return (
            f"Ray's dashboard: http://{dashboard_url} (token authentication is OFF: RAY_AUTH_MODE is "
            f"{os.environ.get('RAY_AUTH_MODE')!r} here; unset it to have Ray protect the cluster)"
        )
    return (
        f"Ray's dashboard: http://{dashboard_url}, with token authentication (the token: `ray get-auth-token`).\n"
        "From another shell: `export RAY_AUTH_MODE=token`, then `serve status` or `ray job submit ...`."
    )


if __name__ == "__main__":
    sys.exit(main())
