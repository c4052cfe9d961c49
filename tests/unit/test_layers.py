"""The package's import order, checked on its source: every `import` (at module level or inside
a function) must point down the layers docs/architecture.md draws, and no module may reach
itself through its imports.

    api -> core -> contract            engines -> contract        weights -> contract
    runtime.child -> engines.registry  (the only part of the runtime that learns backends)
    wiring, cli: the top, where the layers meet; cluster (Ray Serve) above the wiring
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

PACKAGE = "vllm_obtain"
SOURCE = Path(__file__).resolve().parents[2] / "src" / PACKAGE

# Layer -> the layers its modules may import (besides their own, and the package's __init__,
# "", which holds only the version and imports nothing). Top-level modules are layers of their
# own, by name.
ALLOWED: dict[str, set[str]] = {
    "contract": set(),
    "core": {"contract"},
    "engines": {"contract"},
    "weights": {"contract"},
    "logs": set(),
    "runtime": {"contract", "engines", "logs"},
    "api": {"core", "contract"},
    "settings": {"engines"},
    "hardware": {"contract", "engines", "weights"},
    "bench": set(),
    "wiring": {
        "api", "core", "contract", "doctor", "engines", "hardware", "logs", "runtime", "settings",
        "weights",
    },
    # The server on Ray Serve: above the wiring, whose pieces its deployments assemble.
    "cluster": {"contract", "core", "hardware", "logs", "runtime", "settings", "wiring"},
    # What this machine has (`doctor`, the dashboard): read from the layers that know it.
    "doctor": {"contract", "engines", "hardware", "settings", "weights"},
    "cli_flags": {"settings"},
    "model_commands": {"cli_flags", "contract", "hardware", "settings", "weights"},
    "cli": {
        "contract", "core", "engines", "hardware", "settings", "weights", "wiring", "bench",
        "cli_flags", "model_commands", "cluster", "doctor",
    },
    "__main__": {"cli"},
    "": set(),
}  # fmt: skip
# Outside a backend's own package, an engine is reached through the registry only, and only
# these modules may reach it at all: the engine process builds them; the rest need names.
ENGINE_REGISTRY = "vllm_obtain.engines.registry"
MAY_IMPORT_ENGINES = {
    "vllm_obtain.runtime.child",
    "vllm_obtain.settings",
    "vllm_obtain.hardware",
    "vllm_obtain.wiring",
    "vllm_obtain.cli",
    "vllm_obtain.doctor",
}
# Modules every backend may share.
ENGINE_SHARED = {"vllm_obtain.engines.engine_thread"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SOURCE.rglob("*.py"))}


def imports_of(name: str, path: Path) -> Iterator[str]:
    """The modules of this package that `name` imports (absolute names)."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            modules = package_modules()
            for alias in node.names:  # `from pkg import module` imports the module itself
                submodule = f"{target}.{alias.name}"
                yield submodule if submodule in modules else target


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def backend_of(module: str) -> str | None:
    """`vllm_obtain.engines.llama_cpp.engine` -> 'llama_cpp'; None outside the backends."""
    parts = module.split(".")
    if len(parts) > 3 and parts[1] == "engines":
        return parts[2]
    return None


def edges() -> list[tuple[str, str]]:
    return [
        (name, target)
        for name, path in package_modules().items()
        for target in imports_of(name, path)
        if target != name
    ]


def test_the_package_has_the_layers_this_test_knows():
    layers = {layer_of(name) for name in package_modules()}
    assert layers == set(ALLOWED), "add a new layer to ALLOWED, and to docs/architecture.md"


def test_imports_point_down_the_layers():
    upward = [
        f"{importer} imports {imported}"
        for importer, imported in edges()
        if layer_of(imported) not in (layer_of(importer), "")
        and layer_of(imported) not in ALLOWED[layer_of(importer)]
    ]
    assert not upward


def test_backends_are_reached_only_through_the_registry_by_the_modules_that_build_or_name_them():
    for importer, imported in edges():
        if layer_of(imported) != "engines" or layer_of(importer) == "engines":
            continue
        assert importer in MAY_IMPORT_ENGINES, f"{importer} imports {imported}"
        assert imported == ENGINE_REGISTRY, f"{importer} imports the backend {imported}"


def test_backends_know_only_the_contract_and_their_own_package():
    for importer, imported in edges():
        backend = backend_of(importer)
        if backend is None or layer_of(imported) != "engines":
            continue
        assert backend_of(imported) == backend or imported in ENGINE_SHARED, (
            f"{importer} imports {imported}"
        )


def test_the_supervisor_and_the_wire_never_learn_a_backend():
    for importer, imported in edges():
        if importer in ("vllm_obtain.runtime.supervisor", "vllm_obtain.runtime.wire"):
            assert layer_of(imported) in ("contract", "runtime"), f"{importer} imports {imported}"


def test_nothing_imports_the_api_but_the_app_factory():
    importers = {i for i, target in edges() if layer_of(target) == "api" and layer_of(i) != "api"}
    assert importers <= {"vllm_obtain.wiring"}


def test_no_module_reaches_itself_through_its_imports():
    graph: dict[str, set[str]] = {}
    for importer, imported in edges():
        graph.setdefault(importer, set()).add(imported)
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            raise AssertionError("import circle: " + " -> ".join(cycle))
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_checker_sees_an_upward_import(tmp_path: Path):
    """The parser itself: a core module importing the api is found as such an edge."""
    fake = tmp_path / "planning.py"
    fake.write_text("from vllm_obtain.api.errors import OpenAIError\n")
    found = list(imports_of("vllm_obtain.core.planning", fake))
    assert found == ["vllm_obtain.api.errors"]
    assert layer_of(found[0]) not in ALLOWED["core"]
