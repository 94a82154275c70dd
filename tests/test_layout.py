"""The package's rooms and the direction of their imports: cdk -> definition -> config; operations and the
local emulation use the definition, never the constructs; no import cycle, deferred imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "constructs" / "spot_training"
# What each room may import besides itself (the trainer is the shipped training code, imported by name).
ALLOWED = {
    "config": {"trainer"},
    "definition": {"config", "trainer"},
    "cdk": {"config", "definition"},
    "operations": {"config", "definition"},
    "local": {"config", "definition", "operations", "trainer"},
    "cli": {"config", "definition", "operations", "local", "trainer"},
    "__init__": {"cdk", "config"},  # the public API
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).parts
        if relative[0] == "trainer" or "__pycache__" in relative or relative[0] == "cdk" and relative[1] == "monitor":
            continue  # the trainer and the monitor's Lambda code are shipped as files, not imported
        found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every spot_training module `path` imports, wherever the import statement is (deferred ones too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("spot_training"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spot_training"):
            names.add(node.module)
            # `from spot_training.config import sizing` imports the module spot_training.config.sizing
            names.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
    return names


GRAPH = {name: {i for i in _imports(path) if i in MODULES and i != name} for name, path in MODULES.items()}


def _room(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_every_module_lives_in_a_room_with_a_docstring_saying_what_it_may_import():
    rooms = {_room(m) for m in MODULES}
    assert rooms == set(ALLOWED)
    for room in rooms - {"__init__", "cli"}:
        docstring = ast.get_docstring(ast.parse((PACKAGE / room / "__init__.py").read_text()))
        assert docstring and "May import" in docstring, room


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    room = _room(module)
    imported = {_room(i) for i in _imports(MODULES[module]) if i.startswith("spot_training.")} - {room}
    imported |= {"trainer" for i in _imports(MODULES[module]) if i.startswith("spot_training.trainer")}
    assert imported <= ALLOWED[room], f"{module} imports {sorted(imported - ALLOWED[room])}"


def test_no_import_cycle_even_through_deferred_imports():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_shipped_trainer_imports_nothing_of_the_construct_package():
    for path in sorted((ROOT / "trainer").glob("*.py")):
        assert not {i for i in _imports(path) if i.startswith("spot_training")}, path.name
