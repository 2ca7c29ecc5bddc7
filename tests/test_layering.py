"""The layers, as the architecture section of the README draws them, checked on the source itself.

app/protocol and app/kv are shared formats; app/router decides and app/gateway carries requests,
neither with Ray; engines know neither the router nor the API; packages import each other in one
direction only.
"""

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parents[1] / "app"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def package_of(path: Path) -> str:
    parts = path.relative_to(APP).with_suffix("").parts
    return parts[0]


def modules_in(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (APP / package).rglob("*.py"))


def test_router_and_gateway_core_import_no_ray():
    for path in modules_in("router", "gateway", "kv", "protocol", "openai", "api"):
        ray = sorted(m for m in imports_of(path) if m == "ray" or m.startswith("ray."))
        assert not ray, f"{path.relative_to(APP.parent)} imports {ray}"


@pytest.mark.parametrize(("package", "forbidden"), [
    ("engines", ("app.router", "app.api", "app.gateway", "app.deployments")),
    ("router", ("app.api", "app.openai", "app.gateway", "app.engines", "app.deployments", "app.config")),
    ("gateway", ("app.api", "app.openai", "app.engines", "app.deployments", "app.config")),
    ("kv", ("app.router", "app.api", "app.openai", "app.gateway", "app.engines", "app.deployments")),
    ("protocol", ("app.router", "app.api", "app.openai", "app.gateway", "app.engines", "app.deployments")),
    ("openai", ("app.router", "app.api", "app.gateway", "app.engines", "app.deployments")),
])
def test_each_layer_imports_only_the_layers_below_it(package, forbidden):
    for path in modules_in(package):
        bad = sorted(m for m in imports_of(path) if m.startswith(forbidden))
        assert not bad, f"{path.relative_to(APP.parent)} imports {bad}"


def test_no_import_cycles_among_apps_packages():
    graph: dict[str, set[str]] = {}
    for path in APP.rglob("*.py"):
        source = package_of(path)
        for module in imports_of(path):
            if module.startswith("app."):
                target = module.split(".")[1]
                if target != source:
                    graph.setdefault(source, set()).add(target)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, way = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return [*way, start]
                if nxt not in way:
                    stack.append((nxt, [*way, nxt]))
        return None

    for package in graph:
        cycle = cycle_from(package)
        assert cycle is None, "import cycle: " + " -> ".join(cycle)
