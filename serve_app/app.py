"""build_app(args): binds the pools (one per own-placed model, their realtime variants, the shared multiplexed
pool) and the ingress into one application."""

from __future__ import annotations

from ray.serve import Application
from ray.serve.config import BackpressureConfig, RequestRouterConfig

from serve_app.catalog import SHARED, Catalog
from serve_app.hardware import load_profile_rows
from serve_app.ingress import Ingress
from serve_app.replica import PoolReplica
from serve_app.routing import SpreadRouter
from serve_app.settings import MODALITIES, Settings
from serve_app.shared_replica import SharedReplica


def bind_pools(settings: Settings, realtime: bool) -> dict[str, Application | None]:
    """One deployment per own-placed model (or per such model with realtime replicas, for the realtime variant),
    by key: "text", "image_text", "model_<name>". A disabled default pool is there as None."""
    profiles = load_profile_rows(settings.batch_profiles_path)
    bound: dict[str, Application | None] = dict.fromkeys(MODALITIES)
    for served in Catalog(settings).models:
        pool_settings = served.settings
        if served.placement != "own" or (realtime and pool_settings.realtime_replicas == 0):
            continue
        options = (
            pool_settings.realtime_options(f"{served.key}_realtime_pool")
            if realtime
            else pool_settings.deployment_options(f"{served.key}_pool")
        )
        bound[served.key] = PoolReplica.options(
            **options,
            **router_options(settings),
            **shutdown_options(settings),
            logging_config={"log_level": settings.log_level},
        ).bind(
            served.modality,
            pool_settings,
            settings.model_cache_dir,
            profiles,
            realtime,
            served.name,
            served.key,
            served.set_where("model"),
        )
    return bound


# A replica being replaced (a redeploy, a scale-down) finishes the requests it holds: it waits past the longest
# a request may take, plus this, before Serve stops it (Serve's default, 20 s, is under request_timeout_s' 30).
SHUTDOWN_MARGIN_S = 10.0


def shutdown_options(settings: Settings) -> dict:
    return {"graceful_shutdown_timeout_s": settings.request_timeout_s + SHUTDOWN_MARGIN_S}


def router_options(settings: Settings) -> dict:
    """How the ingress's calls to a pool pick a replica (pool_router); Serve's default needs no option."""
    if settings.pool_router == "power_of_two":
        return {}
    return {"request_router_config": RequestRouterConfig(request_router_class=SpreadRouter)}


def bind_shared(settings: Settings) -> Application | None:
    """The shared multiplexed pool, where any model is placed in it."""
    shared = {m.name: (m.modality, m.settings) for m in Catalog(settings).models if m.placement == "shared"}
    if not shared:
        return None
    return SharedReplica.options(
        **settings.shared_pool.deployment_options(f"{SHARED}_pool"),
        **router_options(settings),
        **shutdown_options(settings),
        logging_config={"log_level": settings.log_level},
    ).bind(shared, settings.shared_pool, settings.model_cache_dir, load_profile_rows(settings.batch_profiles_path))


def build_app(args: dict | None = None) -> Application:
    """The application builder for `serve run`/`serve deploy`: args are Settings fields (env fills the rest)."""
    settings = Settings(**(args or {}))
    return Ingress.options(
        **settings.ingress.deployment_options(),
        **shutdown_options(settings),
        # The proxy's own refusals (ingress queue full) carry Retry-After too.
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=settings.retry_after_s),
        logging_config={"log_level": settings.log_level},
    ).bind(
        bind_pools(settings, realtime=False),
        bind_pools(settings, realtime=True),
        settings,
        settings.instruction_templates(),
        bind_shared(settings),
    )
