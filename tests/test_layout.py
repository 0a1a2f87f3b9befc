"""The direction of imports: the ingress loads no torch, scoring no Ray, a family not the family registry."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def modules_after_import(*modules: str) -> set[str]:
    """sys.modules of a fresh interpreter after importing `modules` (this process has imported everything)."""
    code = f"import sys, json\nfor m in {list(modules)!r}: __import__(m)\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return set(json.loads(out.stdout))


def test_the_ingress_api_and_schemas_load_no_torch():
    loaded = modules_after_import("serve_app.ingress", "serve_app.api", "serve_app.schemas")
    assert "serve_app.ingress" in loaded  # the import itself worked
    assert not {"torch", "transformers"} & loaded
    assert not {m for m in loaded if m.startswith(("serve_app.scoring.", "serve_app.replica", "serve_app.pools"))} - {
        "serve_app.scoring.types"
    }


@pytest.mark.parametrize("family", ["cross_encoder", "embedding", "dual_encoder", "blip_itm"])
def test_a_family_loads_neither_ray_nor_the_family_registry(family):
    loaded = modules_after_import(f"serve_app.scoring.{family}")
    assert "torch" in loaded
    assert "ray" not in loaded and "fastapi" not in loaded
    assert "serve_app.scoring.loading" not in loaded


def test_the_registry_loads_a_family_only_when_a_model_of_it_loads():
    loaded = modules_after_import("serve_app.scoring.loading")
    assert not {f"serve_app.scoring.{f}" for f in ("cross_encoder", "embedding", "dual_encoder", "blip_itm")} & loaded
