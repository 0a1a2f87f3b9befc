"""build_app(args): binds the two pools (and their realtime variants) and the ingress into one application."""

from __future__ import annotations

from ray.serve import Application
from ray.serve.config import BackpressureConfig

from serve_app.hardware import load_profile_rows
from serve_app.ingress import Ingress
from serve_app.replica import PoolReplica
from serve_app.settings import POOLS, Settings, replica_options


def bind_pools(settings: Settings, realtime: bool) -> dict[str, Application | None]:
    """One deployment per enabled pool (or per pool with realtime replicas, for the realtime variant)."""
    profiles = load_profile_rows(settings.batch_profiles_path)
    bound: dict[str, Application | None] = {}
    for pool in POOLS:
        pool_settings = settings.pool(pool)
        if not pool_settings.enabled or (realtime and pool_settings.realtime_replicas == 0):
            bound[pool] = None
            continue
        options = (
            pool_settings.realtime_options(f"{pool}_realtime_pool")
            if realtime
            else pool_settings.deployment_options(f"{pool}_pool")
        )
        bound[pool] = PoolReplica.options(**options, logging_config={"log_level": settings.log_level}).bind(
            pool, pool_settings, settings.model_cache_dir, profiles, realtime
        )
    return bound


def build_app(args: dict | None = None) -> Application:
    """The application builder for `serve run`/`serve deploy`: args are Settings fields (env fills the rest)."""
    settings = Settings(**(args or {}))
    return Ingress.options(
        **replica_options(settings.ingress_replicas, settings.ingress_autoscaling),
        max_ongoing_requests=settings.ingress_max_ongoing_requests,
        max_queued_requests=settings.ingress_max_queued_requests,
        # The proxy's own refusals (ingress queue full) carry Retry-After too.
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=settings.retry_after_s),
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
        logging_config={"log_level": settings.log_level},
    ).bind(
        bind_pools(settings, realtime=False),
        bind_pools(settings, realtime=True),
        settings,
        settings.instruction_templates(),
    )
