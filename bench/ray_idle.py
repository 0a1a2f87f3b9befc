"""Idle CPU of Ray's own processes while the Serve application sits idle, per configuration of Ray/Serve env vars.

For each configuration (a dict of env vars, applied in a fresh subprocess before ray.init, since Ray's C++ core and
Serve read them at start) the child starts Ray and Serve the way the service does, deploys the application with the
default text model, sends one rerank request, waits WARMUP_S, then samples for SAMPLE_S the CPU time (utime+stime
from /proc/<pid>/stat) of every Ray process descended from it, grouped by a readable name (gcs_server, raylet,
dashboard_agent, ServeController, ProxyActor, ServeReplica:..., IDLE workers, ...). It then checks that the HTTP
route still answers 200 and that our counter (ray_rerank_pairs_scored) is exported on Ray's Prometheus endpoint.
CPU % is of one core. Only the child's own descendants are counted, so another Ray on the machine is not included.

Run:  .venv/bin/python -m bench.ray_idle [--only baseline,combined] [--sample-s 30]
Writes bench/results/ray-idle-cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "ray-idle-cpu.json"
BUSY = ("bench.compare", "bench.admission", "bench.tokenize", "pytest")
MAX_WAIT_S = 600
WARMUP_S = 10
RAY_MARKERS = ("raylet", "gcs_server", "dashboard", "agent", "log_monitor", "ray::", "serve", "default_worker")
RAY_MARKERS += ("runtime_env", "autoscaler")

CONFIGS: dict[str, dict[str, str]] = {
    "baseline": {},
    "serve_control_loop_1s": {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0"},
    "serve_metrics_export_1s": {"RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"},
    "task_events_off": {"RAY_task_events_report_interval_ms": "0"},
    "log_monitor_backoff": {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "5"},
    "raylet_timers_1s": {
        "RAY_raylet_report_resources_period_milliseconds": "1000",
        "RAY_raylet_check_gc_period_milliseconds": "1000",
    },
    "event_stats_off": {"RAY_event_stats": "0"},
    "no_idle_workers": {
        "RAY_enable_worker_prestart": "0",
        "RAY_prestart_worker_first_driver": "0",
        "RAY_num_workers_soft_limit": "0",
    },
    "agent_reporter_15s": {"REPORTER_UPDATE_INTERVAL_MS": "15000"},
}
CONFIGS["combined"] = {k: v for name, env in CONFIGS.items() for k, v in env.items()}
# The settings that measured quieter on their own, and give up nothing this service uses.
CONFIGS["recommended"] = CONFIGS["serve_control_loop_1s"] | CONFIGS["event_stats_off"] | CONFIGS["raylet_timers_1s"]
# ... plus the observability-only trims that measured neutral alone but quieter together (combined).
CONFIGS["recommended_plus"] = (
    CONFIGS["recommended"]
    | CONFIGS["task_events_off"]
    | CONFIGS["log_monitor_backoff"]
    | CONFIGS["serve_metrics_export_1s"]
)


# ---------------------------------------------------------------- /proc helpers


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime ticks) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int) -> dict[int, int]:
    """pid -> cpu ticks of every live descendant of root."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _stat(int(entry))):
            children.setdefault(st[0], []).append(int(entry))
            ticks[int(entry)] = st[1]
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = ticks[child]
            todo.append(child)
    return found


def group_of(cmd: str) -> str | None:
    """A readable name for a Ray process, None when it is not one."""
    if not any(marker in cmd for marker in RAY_MARKERS):
        return None
    argv0 = cmd.split(" ", 1)[0]
    if argv0.startswith("ray::"):
        return argv0.removeprefix("ray::").split(".", 1)[0] or "ray::?"
    for needle, name in (
        ("gcs_server", "gcs_server"),
        ("raylet/raylet", "raylet"),
        ("dashboard/agent.py", "dashboard_agent"),
        ("runtime_env/agent/main.py", "runtime_env_agent"),
        ("log_monitor.py", "log_monitor"),
        ("monitor.py", "autoscaler_monitor"),
        ("dashboard.py", "dashboard"),
        ("default_worker.py", "starting_worker"),
    ):
        if needle in cmd:
            return name
    return "other:" + Path(argv0).name


def ray_pids(root: int) -> dict[int, int]:
    return {pid: t for pid, t in descendants(root).items() if group_of(_cmdline(pid))}


def sample(root: int, seconds: float) -> dict[str, float]:
    """CPU % of one core per group over `seconds`, polling each second so short-lived processes count too."""
    first = ray_pids(root)
    last = dict(first)
    names = {pid: group_of(_cmdline(pid)) for pid in first}
    start = time.monotonic()
    while (left := seconds - (time.monotonic() - start)) > 0:
        time.sleep(min(1.0, left))
        for pid, t in ray_pids(root).items():
            last[pid] = t
            names.setdefault(pid, group_of(_cmdline(pid)))
    elapsed = time.monotonic() - start
    hz = os.sysconf("SC_CLK_TCK")
    groups: dict[str, float] = {}
    for pid, t in last.items():
        name = names[pid] or "?"
        groups[name] = groups.get(name, 0.0) + (t - first.get(pid, 0)) / hz / elapsed * 100
    return {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


# ---------------------------------------------------------------- child: one configuration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rerank(url: str) -> tuple[int, str]:
    """(status, body head) of one rerank call; status 0 when the call itself failed."""
    import httpx

    try:
        response = httpx.post(url, json={"query": "q", "documents": ["a", "b"]}, timeout=60)
        return response.status_code, response.text[:300]
    except httpx.HTTPError as e:
        return 0, repr(e)[:300]


def _metrics_ok(port: int, within_s: float = 30) -> bool:
    import httpx

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            if any(line.startswith("ray_rerank_pairs_scored") for line in text.splitlines()):
                return True
        except httpx.HTTPError:
            pass
        time.sleep(2)
    return False


def child(sample_s: float) -> dict:
    import ray
    from ray import serve

    from serve_app.app import build_app

    result: dict = {"http_ok": False, "metrics_ok": False}
    port = _free_port()
    url = f"http://127.0.0.1:{port}/idle/v2/rerank"
    ray.init(address="local", num_cpus=6, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        started = time.monotonic()
        app = build_app(
            {"text": {"model": "sentence-transformers/all-MiniLM-L6-v2"}, "image_text": {"enabled": False}}
            | {"log_level": "WARNING"}
        )
        serve.run(app, name="idle", route_prefix="/idle")
        result["deploy_s"] = round(time.monotonic() - started, 1)
        deadline = time.monotonic() + 180  # the pools may still be loading the model after serve.run returns
        while (status := _rerank(url))[0] != 200 and time.monotonic() < deadline:
            time.sleep(2)
        status, body = status
        result["first_request"] = {"status": status, "body": body, "after_s": round(time.monotonic() - started, 1)}
        time.sleep(WARMUP_S)
        result["groups"] = sample(os.getpid(), sample_s)
        result["total"] = round(sum(result["groups"].values()), 2)
        after, body = _rerank(url)
        result["after_idle_request"] = {"status": after, "body": body}
        result["http_ok"] = status == after == 200
        metrics_port = ray._private.worker.global_worker.node.metrics_export_port
        result["metrics_port"] = metrics_port
        result["metrics_ok"] = _metrics_ok(metrics_port)
    finally:
        result["ray_pids"] = sorted(ray_pids(os.getpid()))
        serve.shutdown()
        ray.shutdown()
    return result


# ---------------------------------------------------------------- parent


def wait_quiet(budget_s: float) -> float:
    """Wait until no disturbing benchmark/test runs; returns the seconds waited (stops at budget_s)."""
    start = time.monotonic()
    while time.monotonic() - start < budget_s:
        pattern = "|".join(BUSY)
        mine = {str(os.getpid())}
        busy = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        if not set(busy) - mine:
            break
        time.sleep(5)
    return time.monotonic() - start


def reap(pids: list[int]) -> list[int]:
    """Kill, by pid, those of the given Ray processes that outlived ray.shutdown(); returns the ones killed."""
    killed = []
    time.sleep(3)
    for pid in pids:
        if group_of(_cmdline(pid)):
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
    return killed


def run_config(name: str, env: dict[str, str], sample_s: float) -> dict:
    with_env = os.environ | env
    cmd = [sys.executable, "-m", "bench.ray_idle", "--child", "--sample-s", str(sample_s)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=with_env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        return {"error": f"timeout; stderr tail: {(e.stderr or b'')[-1500:]!r}"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        return {"error": f"rc={done.returncode}; stderr tail: {done.stderr[-1500:]}"}
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["leftover_killed"] = reap(result.pop("ray_pids", []))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated configuration names")
    parser.add_argument("--sample-s", type=float, default=30.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-wait-s", type=float, default=MAX_WAIT_S, help="total wait for quiet before measuring")
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.sample_s)), flush=True)
        return

    import ray

    names = args.only.split(",") if args.only else list(CONFIGS)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    configs = previous.get("configs", {})
    waited = 0.0
    for name in names:
        left = max(0.0, args.max_wait_s - waited)
        this_wait = wait_quiet(left)
        waited += this_wait
        print(f"[{name}] waited {this_wait:.0f}s for quiet; running", file=sys.stderr, flush=True)
        result = run_config(name, CONFIGS[name], args.sample_s)
        result["env"] = CONFIGS[name]
        result["waited_for_quiet_s"] = round(this_wait, 1)
        result["measured_while_busy"] = waited >= args.max_wait_s
        result["measured_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        configs[name] = result
        print(f"[{name}] {json.dumps(result)}", file=sys.stderr, flush=True)
        doc = {
            "what": "idle CPU % (of one core) of Ray's own processes with the Serve app deployed and idle",
            "ray_version": ray.__version__,
            "date": datetime.now(timezone.utc).date().isoformat(),
            "command": "/work/main/.venv/bin/python -m bench.ray_idle " + " ".join(sys.argv[1:]),
            "sample_s": args.sample_s,
            "warmup_s": WARMUP_S,
            "cpus": os.cpu_count(),
            "configs": configs,
        }
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print_table(configs)


def print_table(configs: dict) -> None:
    print(f"{'config':26} {'total%':>7} {'http':>5} {'metrics':>7}  top groups")
    for name, r in configs.items():
        if "error" in r:
            print(f"{name:26} ERROR {r['error'][:80]}")
            continue
        top = ", ".join(f"{g} {v}" for g, v in list(r["groups"].items())[:3])
        print(f"{name:26} {r['total']:7.2f} {r['http_ok']!s:>5} {r['metrics_ok']!s:>7}  {top}")


if __name__ == "__main__":
    main()
