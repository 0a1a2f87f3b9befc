"""The direction of imports: the ingress loads no torch, scoring no Ray, a family not the family registry."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from serve_app.scoring.loading import FAMILIES as REGISTRY

# Every family the registry names, by its module: a family added there is checked here without a word more.
FAMILIES = {family: target.partition(":")[0] for family, target in sorted(REGISTRY.items())}
# What each check imports in a fresh interpreter (this process has imported everything).
IMPORTS = {
    "ingress": ["serve_app.ingress", "serve_app.api", "serve_app.schemas"],
    "bulk": ["serve_app.bulk"],
    "pools": ["serve_app.pools"],
    "loading": ["serve_app.scoring.loading"],
}


def sys_modules_code(modules: list[str]) -> str:
    return f"import sys, json\nfor m in {modules!r}: __import__(m)\nprint(json.dumps(sorted(sys.modules)))"


# sys.modules after importing each family in turn, in one interpreter (torch is imported once, not once a family:
# ~3 s of CPU each). A module a family brings in is in its set and every later one's, so a family that loads Ray
# (or the registry) fails first, by name.
FAMILIES_CODE = (
    "import sys, json\n"
    f"sets = {{}}\nfor f, m in {FAMILIES!r}.items():\n"
    "    __import__(m)\n    sets[f] = sorted(sys.modules)\n"
    "print(json.dumps(sets))"
)


@pytest.fixture(scope="module")
def imported() -> dict:
    """Each check's fresh interpreter, all started at once (each imports for seconds on one core): sys.modules
    after its imports, by check name, and the families' sets under "families"."""
    codes = {name: sys_modules_code(modules) for name, modules in IMPORTS.items()} | {"families": FAMILIES_CODE}
    started = {
        name: subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, code in codes.items()
    }
    found = {}
    try:
        for name, process in started.items():
            out, err = process.communicate(timeout=180)
            assert process.returncode == 0, f"{name}: {err[-3000:]}"
            found[name] = json.loads(out)
    finally:  # one failed or timed out: the others are not left importing beside the next tests
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return {name: set(modules) for name, modules in found.items() if name != "families"} | {
        "families": {family: set(modules) for family, modules in found["families"].items()}
    }


def test_the_ingress_api_and_schemas_load_no_torch(imported):
    loaded = imported["ingress"]
    assert "serve_app.ingress" in loaded  # the import itself worked
    assert not {"torch", "transformers"} & loaded
    replicas = ("serve_app.replica", "serve_app.shared_replica", "serve_app.scoring_replica", "serve_app.resident")
    assert not {m for m in loaded if m.startswith(("serve_app.scoring.", "serve_app.pools", *replicas))} - {
        "serve_app.scoring.types",
        "serve_app.scoring.text",  # tokenizing with the Rust tokenizer alone (tokenize_in=ingress)
        "serve_app.scoring.call",  # the window rule a request's calls are given
    }


def test_the_bulk_driver_and_its_row_tasks_load_no_torch(imported):
    # Each row-reading task's worker imports serve_app.bulk: with torch that cost ~3 s of CPU a worker.
    # Only the scoring actors load torch (serve_app.pools, in PairScorer).
    loaded = imported["bulk"]
    assert "serve_app.bulk" in loaded and "serve_app.hardware" in loaded
    assert not {"torch", "transformers", "serve_app.pools"} & loaded


def test_the_serving_path_loads_no_scikit_learn(imported):
    # pools applies the fitted map (score_fit.ScoreMap); only fitting one (calibrate_scores) needs the `fit` extra.
    loaded = imported["pools"]
    assert "serve_app.score_fit" in loaded
    assert "sklearn" not in loaded


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_loads_neither_ray_nor_the_family_registry(family, imported):
    loaded = imported["families"][family]
    assert FAMILIES[family] in loaded and "torch" in loaded
    assert "ray" not in loaded and "fastapi" not in loaded
    assert "serve_app.scoring.loading" not in loaded


def test_the_registry_loads_a_family_only_when_a_model_of_it_loads(imported):
    loaded = imported["loading"]
    assert "serve_app.scoring.loading" in loaded and not set(FAMILIES.values()) & loaded


# Rows of the README's Layout picture, top to bottom: a module imports only from rows below its own.
LAYERS = [
    ["__main__"],
    ["app"],
    ["ingress"],
    ["api", "status", "encoders"],
    ["replica", "shared_replica", "bulk", "calibrate", "calibrate_scores", "embeddings"],
    ["scoring_replica"],
    ["resident"],
    ["pools"],
    ["scoring.loading"],
    ["scoring.cross_encoder", "scoring.embedding", "scoring.dual_encoder", "scoring.blip_itm", "scoring.yes_no"],
    ["scoring.family", "hardware", "score_fit", "score_cache", "experiment", "pool_queues"],
    ["scoring.batching", "scoring.call", "scoring.graphs", "schemas", "media", "catalog"],
    ["scoring.text", "errors", "ranking", "pool_call"],
    ["scoring.types", "settings", "stats", "ports", "scoring", "local_ray", "routing"],
    ["pages"],
]
PACKAGE = Path(__file__).resolve().parent.parent / "serve_app"


def runtime_nodes(tree: ast.AST):
    """Every node, but not those under `if TYPE_CHECKING:` (annotations only: no import at run time)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            continue
        yield node
        yield from runtime_nodes(node)


def package_imports(path: Path) -> set[str]:
    """The serve_app modules a file imports at run time, anywhere in it (inside functions too), without the
    prefix."""
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from serve_app import hardware` imports a module; `from serve_app.x import y` imports x.
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "serve_app" else [node.module]
        else:
            continue
        found |= {name.removeprefix("serve_app.") for name in names if name.startswith("serve_app.")}
    return found


def test_every_import_in_the_package_points_down():
    row = {module: i for i, modules in enumerate(LAYERS) for module in modules}
    files = {
        str(path.relative_to(PACKAGE).with_suffix("")).replace("/", ".").removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
        if path != PACKAGE / "__init__.py"
    }
    assert set(files) == set(row), "place each new module in a row of LAYERS (and the README's picture)"
    upward = [
        f"{module} imports {imported}"
        for module, path in files.items()
        for imported in package_imports(path)
        if row[imported] <= row[module] and imported != module
    ]
    assert not upward


LONGEST_FUNCTION = 60


def test_no_function_in_the_package_is_longer_than_a_screen():
    """A function a reader can hold in their head: past LONGEST_FUNCTION lines, cut it into named steps."""
    long = [
        f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in PACKAGE.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]
    assert not long, long


def test_the_request_path_and_the_pool_replica_each_fit_one_file_a_reader_can_hold():
    """ingress.py holds the request path only (status.py: what the service says about itself; encoders.py: the
    tokenizers); replica.py the pool replica only (scoring_replica.py: the call path; shared_replica.py)."""
    sizes = {name: len((PACKAGE / name).read_text().splitlines()) for name in ("ingress.py", "replica.py")}
    assert all(lines < 400 for lines in sizes.values()), sizes
