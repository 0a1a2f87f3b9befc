"""build_app(args): binds the two pools and the ingress into one Serve application."""

from __future__ import annotations

from ray.serve import Application

from serve_app.ingress import Ingress
from serve_app.replica import PoolReplica
from serve_app.settings import Settings


def bind_pool(name: str, settings: Settings) -> Application | None:
    pool = getattr(settings, name)
    if not pool.enabled:
        return None
    return PoolReplica.options(
        name=f"{name}_pool",
        num_replicas=pool.num_replicas,
        ray_actor_options=pool.ray_actor_options(),
        user_config={
            "max_batch_size": pool.max_batch_size,
            "batch_wait_timeout_s": pool.batch_wait_timeout_s,
        },
    ).bind(name, pool, settings.model_cache_dir)


def build_app(args: dict | None = None) -> Application:
    """The application builder for `serve run`/`serve deploy`: args are Settings fields (env fills the rest)."""
    settings = Settings(**(args or {}))
    return Ingress.options(
        num_replicas=settings.ingress_replicas,
        max_ongoing_requests=settings.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
        logging_config={"log_level": settings.log_level},
    ).bind(
        bind_pool("text", settings),
        bind_pool("image_text", settings),
        settings,
        settings.instruction_templates(),
    )
