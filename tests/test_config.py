"""The shipped configuration: the Serve config builds the application and its args are settings (tests/test_docs.py
holds the settings page to the fields)."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from ray.serve import Application

from serve_app.settings import DEPLOY_DIR, Settings

ROOT = Path(__file__).resolve().parent.parent


def test_serve_config_builds_the_application():
    config = yaml.safe_load((DEPLOY_DIR / "serve_config.yaml").read_text())
    (application,) = config["applications"]
    module, builder = application["import_path"].split(":")
    app = getattr(importlib.import_module(module), builder)(application["args"])
    assert isinstance(app, Application)
    assert config["http_options"]["host"] == "127.0.0.1"  # localhost unless configured


def test_serve_config_args_are_settings_fields():
    config = yaml.safe_load((DEPLOY_DIR / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    settings = Settings(**args)
    assert settings.text.autoscaling.max_replicas == args["text"]["autoscaling"]["max_replicas"]
    assert settings.request_timeout_s < config["http_options"]["request_timeout_s"]  # ours answers 504 first
    assert settings.image_text.model == args["image_text"]["model"]


def test_image_text_pool_keeps_its_own_defaults_when_partly_configured():
    settings = Settings(image_text={"num_replicas": 2})
    assert settings.image_text.num_cpus < settings.text.num_cpus
    assert settings.image_text.model != settings.text.model


def test_serve_config_serves_two_text_models_and_one_image_text_model():
    from serve_app.catalog import Catalog

    config = yaml.safe_load((DEPLOY_DIR / "serve_config.yaml").read_text())
    catalog = Catalog(Settings(**config["applications"][0]["args"]))
    assert sorted(m.modality for m in catalog.models) == ["image_text", "text", "text"]
    assert {m.placement for m in catalog.models} == {"own", "shared"}
    assert catalog.find("rerank-v3.5").name == "ms-marco-minilm" and catalog.find("jina-reranker-m0").name == "clip"


def test_a_pools_health_check_period_reaches_serve_and_its_realtime_variant():
    pool = Settings(text={"health_check_period_s": 2, "realtime_replicas": 1}).text
    assert pool.deployment_options("text_pool")["health_check_period_s"] == 2
    assert pool.realtime_options("text_realtime_pool")["health_check_period_s"] == 2
    assert Settings().text.deployment_options("text_pool")["health_check_period_s"] == 10  # Serve's own default


def test_a_shared_model_with_replica_settings_of_its_own_is_refused_not_ignored():
    import pytest
    from pydantic import ValidationError

    shared = {"name": "tail", "model": "/models/tail", "placement": "shared"}
    assert Settings(models=[shared]).models[0].placement == "shared"
    for field, value in (("num_gpus", 1), ("autoscaling", {"max_replicas": 2}), ("realtime_replicas", 1)):
        with pytest.raises(ValidationError, match=f"shared pool.*{field}.*set them under shared_pool"):
            Settings(models=[{**shared, field: value}])
    own = Settings(models=[{**shared, "placement": "own", "num_gpus": 1}]).models[0]  # its own pool: taken
    assert own.ray_actor_options()["num_gpus"] == 1
    options = Settings(shared_pool={"num_gpus": 0.5, "max_queued_requests": 9}).shared_pool.deployment_options("s")
    assert options["ray_actor_options"]["num_gpus"] == 0.5 and options["max_queued_requests"] == 9


def test_the_ingress_group_and_its_old_flat_names_for_one_release(monkeypatch):
    import pytest
    from pydantic import ValidationError

    grouped = Settings(ingress={"replicas": 2, "max_queued_requests": 7})
    assert (grouped.ingress.replicas, grouped.ingress.max_queued_requests, grouped.ingress.num_cpus) == (2, 7, 0.5)
    old = Settings(ingress_replicas=3, ingress_autoscaling={"max_replicas": 5})  # as a Serve config's args
    assert old.ingress.replicas == 3 and old.ingress.autoscaling.max_replicas == 5
    assert old.ingress.deployment_options()["num_replicas"] == "auto"
    monkeypatch.setenv("RERANK_INGRESS_NUM_CPUS", "0.25")  # an old env name
    assert Settings().ingress.num_cpus == 0.25
    monkeypatch.setenv("RERANK_INGRESS__NUM_CPUS", "0.75")  # and the new one beside it: which wins is not obvious
    with pytest.raises(ValidationError, match="ingress.num_cpus and its old name ingress_num_cpus are both set"):
        Settings()


def test_every_deployment_drains_longer_than_a_request_may_take():
    """A redeploy or a scale-down stops a replica after its graceful shutdown: Serve's default (20 s) is under
    request_timeout_s (30 s), so a request a replaced ingress or pool still held ended in a 500."""
    from serve_app.app import build_app

    config = yaml.safe_load((DEPLOY_DIR / "serve_config.yaml").read_text())
    args = config["applications"][0]["args"]
    app = build_app(args)
    ingress = app._bound_deployment
    bound = [*ingress.init_args[0].values(), *ingress.init_args[1].values(), ingress.init_args[4]]
    deployments = [ingress, *(pool._bound_deployment for pool in bound if pool is not None)]
    assert len(deployments) >= 4  # the ingress, two own pools, the shared pool
    timeout = Settings(**args).request_timeout_s
    for deployment in deployments:
        assert deployment._deployment_config.graceful_shutdown_timeout_s > timeout, deployment.name
