"""The cluster definitions: cluster.yaml (Ray cluster launcher), deploy/rayservice.yaml (KubeRay) and the
GPU Serve config they both deploy. No Ray cluster needed: Ray's own schema and builders check them."""

from __future__ import annotations

import copy
import importlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from serve_app.settings import DEPLOY_DIR, MODALITIES, Settings

ROOT = Path(__file__).resolve().parent.parent


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def gpu_config() -> dict:
    return load(DEPLOY_DIR / "serve_config.gpu.yaml")


@pytest.fixture(scope="module")
def gpu_settings(gpu_config) -> Settings:
    (application,) = gpu_config["applications"]
    return Settings(**application["args"])


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load(ROOT / "cluster.yaml")


@pytest.fixture(scope="module")
def rayservice() -> dict:
    return load(DEPLOY_DIR / "rayservice.yaml")


def accelerator_types(resources: dict) -> set[str]:
    return {name.split(":", 1)[1] for name in resources if name.startswith("accelerator_type:")}


# --- deploy/serve_config.gpu.yaml ---------------------------------------------------------------------


def test_gpu_serve_config_is_a_valid_serve_config_and_builds_the_application(gpu_config):
    schema = ServeDeploySchema.model_validate(gpu_config)
    assert schema.proxy_location.value == "EveryNode"
    assert schema.http_options.host == "0.0.0.0"  # behind a load balancer
    (application,) = gpu_config["applications"]
    module, builder = application["import_path"].split(":")
    app = getattr(importlib.import_module(module), builder)(application["args"])
    assert isinstance(app, Application)


def test_gpu_serve_config_pins_each_pool_to_one_gpu_kind(gpu_settings):
    assert (gpu_settings.text.accelerator_type, gpu_settings.image_text.accelerator_type) == ("A10G", "L4")
    for name in MODALITIES:
        pool = getattr(gpu_settings, name)
        assert pool.num_gpus >= 1
        assert pool.ray_actor_options()["accelerator_type"] == pool.accelerator_type


# --- cluster.yaml ---------------------------------------------------------------------------------------


def test_cluster_yaml_validates_against_rays_autoscaler_schema(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))  # merges the provider defaults, as `ray up` does
    validate_config(prepared)
    assert set(prepared["available_node_types"]) == set(cluster["available_node_types"])  # none added by defaults


def test_head_is_cpu_only_and_each_pool_has_a_gpu_worker_type_it_fits(cluster, gpu_settings):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and not accelerator_types(head["resources"])
    assert head["resources"]["CPU"] >= gpu_settings.ingress.num_cpus * gpu_settings.ingress.replicas

    workers = {name: spec for name, spec in types.items() if name != cluster["head_node_type"]}
    for pool_name in MODALITIES:
        pool = getattr(gpu_settings, pool_name)
        (name,) = [n for n, spec in workers.items() if pool.accelerator_type in accelerator_types(spec["resources"])]
        resources = workers[name]["resources"]
        assert resources[f"accelerator_type:{pool.accelerator_type}"] >= 1
        assert resources["GPU"] >= pool.num_gpus and resources["CPU"] >= pool.num_cpus, f"{pool_name} cannot fit {name}"
        # The autoscaler may add nodes of this type when replicas cannot be placed.
        assert isinstance(workers[name]["min_workers"], int) and isinstance(workers[name]["max_workers"], int)
        assert 0 <= workers[name]["min_workers"] <= workers[name]["max_workers"]
        assert workers[name]["max_workers"] >= pool.num_replicas + 1
        # A pool replica fills the node's CPUs, so the ingress lands on the head.
        assert resources["CPU"] - pool.num_cpus < gpu_settings.ingress.num_cpus

    assert cluster["max_workers"] >= sum(spec["max_workers"] for spec in workers.values())
    # Every GPU worker type serves some pool.
    pinned = {getattr(gpu_settings, pool).accelerator_type for pool in MODALITIES}
    assert all(accelerator_types(spec["resources"]) & pinned for spec in workers.values())


def test_cluster_installs_the_project_like_the_makefile_and_deploys_it(cluster):
    # The service's own install ($(BIN)/pip), not the benchmark's Infinity virtualenv.
    (makefile_torch,) = re.findall(r"\$\(BIN\)/pip install -q (torch==\S+)", (ROOT / "Makefile").read_text())
    setup = cluster["setup_commands"]
    torch_step = next(i for i, cmd in enumerate(setup) if "torch==" in cmd)
    assert makefile_torch in setup[torch_step].split()  # the same pin as `make install`
    (remote_dir,) = [remote for remote, local in cluster["file_mounts"].items() if local == "."]
    project_step = next(i for i, cmd in enumerate(setup) if re.search(r"pip install (-q )?-e \.", cmd))
    assert torch_step < project_step and f"cd {remote_dir}" in setup[project_step]

    head = " && ".join(cluster["head_start_ray_commands"])
    assert head.index("ray start --head") < head.index("serve deploy deploy/serve_config.gpu.yaml")
    assert f"cd {remote_dir}" in head
    assert any("ray start --address" in cmd for cmd in cluster["worker_start_ray_commands"])


# --- deploy/rayservice.yaml -------------------------------------------------------------------------------


def test_rayservice_embeds_the_gpu_serve_config(rayservice, gpu_config):
    assert rayservice["apiVersion"] == "ray.io/v1" and rayservice["kind"] == "RayService"
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert embedded["applications"] == gpu_config["applications"]
    assert embedded == gpu_config  # proxy_location and http_options too


def start_param_resources(params: dict) -> dict:
    """KubeRay's `resources: '"{\\"accelerator_type:A10G\\": 1}"'`: a quoted JSON object, as `ray start` gets it."""
    value = params.get("resources")
    return json.loads(json.loads(value)) if value else {}


def test_rayservice_worker_groups_match_the_pools(rayservice, gpu_settings):
    cluster = rayservice["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert not accelerator_types(start_param_resources(head["rayStartParams"]))
    for container in head["template"]["spec"]["containers"]:
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})

    groups: dict[str, dict] = {}
    for group in cluster["workerGroupSpecs"]:
        (kind,) = accelerator_types(start_param_resources(group["rayStartParams"]))
        groups[kind] = group
        spec = group["template"]["spec"]
        assert spec["nodeSelector"], f"{group['groupName']}: no nodeSelector for its GPU kind"
        (container,) = spec["containers"]
        gpus = int(group["rayStartParams"]["num-gpus"])
        assert gpus >= 1 and container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]

    assert set(groups) == {getattr(gpu_settings, pool).accelerator_type for pool in MODALITIES}
    for pool_name in MODALITIES:
        pool = getattr(gpu_settings, pool_name)
        params = groups[pool.accelerator_type]["rayStartParams"]
        assert int(params["num-gpus"]) >= pool.num_gpus and float(params["num-cpus"]) >= pool.num_cpus


def test_rayservice_probes_hit_health_on_the_serve_port(rayservice, gpu_config, gpu_settings):
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    containers = [c for pod in pods for c in pod["template"]["spec"]["containers"]]
    assert len(containers) == 1 + len(cluster["workerGroupSpecs"])
    port = gpu_config["http_options"]["port"]
    for container in containers:
        # Readiness scores through the pools; liveness only asks the process (an overloaded pool must not
        # restart pods, least of all the head: that restarts the cluster).
        assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": port}
        assert container["livenessProbe"]["httpGet"] == {"path": "/health/live", "port": port}
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["timeoutSeconds"] > gpu_settings.health_timeout_s


# --- Ray's token authentication ----------------------------------------------------------------------------


def test_every_ray_start_and_cli_call_of_the_cluster_runs_with_token_auth(cluster):
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    commands = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    calls = [c for c in commands if "ray start" in c or "serve " in c]
    assert len(calls) == 3  # head start, serve deploy, worker start
    assert all(c.startswith("export RAY_AUTH_MODE=token;") for c in calls), calls
    assert "RAY_AUTH_MODE=disabled" not in (ROOT / "cluster.yaml").read_text()


def test_a_node_without_the_token_refuses_to_set_up_and_one_with_it_exports_the_mode(cluster, tmp_path):
    """The token steps of setup_commands, run in a shell with a home of their own."""
    token_steps = [c for c in cluster["setup_commands"] if "auth_token" in c or "RAY_AUTH_MODE" in c]
    script = "set -e\n" + "\n".join(token_steps)
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    refused = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "ray get-auth-token --generate" in refused.stderr
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a-token")
    for _ in range(2):  # a rerun of `ray up` adds nothing twice
        assert subprocess.run(["bash", "-c", script], env=env).returncode == 0
    assert (tmp_path / ".bashrc").read_text() == "export RAY_AUTH_MODE=token\n"
    assert (tmp_path / ".ray" / "auth_token").stat().st_mode & 0o077 == 0


def test_the_rayservice_turns_ray_token_authentication_on(rayservice):
    assert rayservice["spec"]["rayClusterConfig"]["authOptions"] == {"mode": "token"}
    assert "RAY_AUTH_MODE" not in (DEPLOY_DIR / "rayservice.yaml").read_text().replace("RAY_AUTH_MODE=token", "")


def test_the_container_image_installs_the_pins_of_pyproject_and_the_makefile():
    """deploy/Dockerfile builds on Ray's image for the Ray pyproject.toml pins, installs the torch the Makefile
    pins (first, as `make` does) and the project; deploy/rayservice.yaml names that image at the project's
    version; the operations page says how to build and push it."""
    root = Path(__file__).resolve().parent.parent
    dockerfile = (root / "deploy" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, flags=re.MULTILINE))
    pyproject = (root / "pyproject.toml").read_text()
    assert re.findall(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject) == [args["RAY_VERSION"]]
    version = re.search(r'^version = "([^"]+)"', pyproject, flags=re.MULTILINE).group(1)
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-${VARIANT}" in dockerfile
    assert set(re.findall(r"torch==([\d.]+)", (root / "Makefile").read_text())) == {args["TORCH_VERSION"]}
    install = dockerfile.index('pip install --no-cache-dir "torch==${TORCH_VERSION}"')
    assert install < dockerfile.index("pip install --no-cache-dir .")  # torch first, as `make` installs it
    images = set(re.findall(r"image: (\S+)", (root / "deploy" / "rayservice.yaml").read_text()))
    assert images == {f"registry.example.com/serve-app:{version}"}
    operations = (root / "docs" / "operations.md").read_text()
    assert "docker build -f deploy/Dockerfile" in operations and "docker push" in operations
