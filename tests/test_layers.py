"""The import direction of the layers the README draws: each module imports only its own layer or lower
ones, and no two modules import each other, even through others (read from the source with ast, so
imports inside functions count too)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# lowest first; a module belongs to the longest prefix that names it
LAYERS = [
    ("infra",),
    ("trainers.config", "trainers.data"),
    ("trainers.model",),
    ("rollout",),
    ("probes",),
    ("trainers.runs",),
    ("sweeps",),
]
PACKAGES = ("infra", "trainers", "rollout", "probes", "sweeps")


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports (`from pkg import module` resolves to the module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name in modules and name.split(".")[0] in PACKAGES and not (ROOT / name.replace(".", "/")).is_dir():
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    assert [m for m in project_modules() if layer_of(m) is None and not m.endswith("__init__")
            and m not in PACKAGES] == []


def test_imports_point_down():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_import_circles():
    edges = graph()
    circles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for target in sorted(edges.get(node, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []


@pytest.mark.parametrize("module, target, expected", [("sweeps.driver", "infra.storage", False),
                                                      ("infra.storage", "sweeps.driver", True),
                                                      ("trainers.data.collate", "trainers.model.logprobs", True),
                                                      ("trainers.runs.evaluation", "probes.scoring", False)])
def test_the_rule_itself(module, target, expected):
    """The layer map orders what the README says: an import from a lower layer is allowed, upward is not."""
    assert (layer_of(target) > layer_of(module)) is expected
