"""The local Ray instance `make run` (and the benchmarks) start: Ray's periodic loops slowed for a small box.

Measured idle on the 2-core VM (`python -m bench.ray_idle`, bench/results/ray-idle-cpu.json): Ray and Serve
take ~10% of one core while the service waits, most of it the Serve controller's 0.1 s loop (and the GCS
calls it makes); these settings bring it to ~6.5%, with Serve, its handles, autoscaling and the Prometheus
export (`ray_rerank_*` series) still working. What they cost: deploys, autoscaling decisions and replica
recovery react up to ~1 s later, `ray list tasks` and the dashboard's task views are empty (task events
off), and new log files are picked up up to 5 s later. A variable already set in the environment wins.
"""

from __future__ import annotations

import os

QUIET_RAY_ENV = {
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "1.0",  # the Serve controller's loop (default 0.1 s): the largest share
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",  # Serve's own metrics flushed each second, not each 0.1 s
    "RAY_event_stats": "0",  # event-loop statistics of raylet and GCS
    "RAY_raylet_report_resources_period_milliseconds": "1000",
    "RAY_raylet_check_gc_period_milliseconds": "1000",
    "RAY_task_events_report_interval_ms": "0",  # no task events to the GCS (`ray list tasks` stays empty)
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "5",  # the log monitor looks for new files every 5 s, not every 0.1 s
}


def quiet_ray_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Set QUIET_RAY_ENV where the environment leaves a variable unset (before ray.init: Ray's processes read
    them at start); the variables set."""
    environ = os.environ if environ is None else environ
    applied = {}
    for name, value in QUIET_RAY_ENV.items():
        if name not in environ:
            environ[name] = applied[name] = value
    return applied
