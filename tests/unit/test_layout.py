"""The package's layout rules, checked on its imports: Ray only at the edges, serving
without the training loop, no module importing a later stage."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[2] / "mmdls_dist"


def imports(path: Path) -> set[str]:
    """Every module a file imports, at top level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def modules() -> dict[str, set[str]]:
    return {
        str(p.relative_to(PACKAGE).with_suffix("")).replace("/", "."): imports(p)
        for p in PACKAGE.rglob("*.py")
    }


def test_ray_is_imported_only_at_the_edges():
    edges = {"parallel", "train.loop", "train.launch", "train.tune", "train.folds"}
    users = {m for m, names in modules().items() if any(n.split(".")[0] == "ray" for n in names)}
    assert users == edges


# stage -> the stages it may import (mmdls_dist.<stage>...)
ALLOWED = {
    "metrics": {"metrics"},
    "data": {"data", "metrics", "config", "options", "storage"},
    "model": {"model", "data.schema", "metrics", "config"},
    "train": {"train", "model", "data", "metrics", "config", "options", "storage"},
    "evaluation": {"evaluation", "train.checkpoint", "model", "data", "metrics", "config"},
}


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_stages_import_only_earlier_stages(stage):
    for module, names in modules().items():
        if not module.startswith(f"{stage}."):
            continue
        ours = {n.removeprefix("mmdls_dist.") for n in names if n.startswith("mmdls_dist.")}
        allowed = ALLOWED[stage] | {"storage", "__version__"}
        bad = {n for n in ours if not any(n == a or n.startswith(f"{a}.") for a in allowed)}
        assert not bad, f"{module} imports {sorted(bad)}"


def test_serving_loads_without_the_training_loop_or_ray():
    code = (
        "import sys\n"
        "import mmdls_dist.evaluation.evaluate, mmdls_dist.evaluation.predict\n"
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')\n"
        "       or m in ('mmdls_dist.train.loop', 'mmdls_dist.train.launch',\n"
        "                'mmdls_dist.train.losses', 'mmdls_dist.train.tune')]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_third_party_import_is_a_declared_runtime_dependency():
    """`pip install mmdls-dist` (no extras) must run every command."""
    import importlib.metadata as md
    import re

    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[<>=~ ;]", d)[0].lower() for d in project["dependencies"]}
    distributions = md.packages_distributions()
    tops = {n.split(".")[0] for names in modules().values() for n in names}
    third_party = tops - set(sys.stdlib_module_names) - {"mmdls_dist", "__future__"}
    missing = {
        top: distributions.get(top, [top])
        for top in third_party
        if not {d.lower() for d in distributions.get(top, [top])} & declared
    }
    assert not missing, f"imported but not declared in [project].dependencies: {missing}"


def test_license_is_an_spdx_expression_with_its_file():
    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert "Apache License" in (PACKAGE.parent / "LICENSE").read_text()[:200]


def test_the_torch_floor_is_what_torchsurv_needs():
    import importlib.metadata as md
    import re

    import tomllib

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    ours = next(d for d in project["dependencies"] if re.match(r"torch\b(?!surv)", d))
    theirs = next(r for r in md.requires("torchsurv") if re.match(r"torch\b(?!surv|metrics)", r))
    assert re.search(r">=\s*([\d.]+)", ours)[1] == re.search(r">=\s*([\d.]+)", theirs)[1]
