"""The layout's rule: project imports point down the layers and never form a circle.

Every import is counted, function-local ones included. Layers, bottom to top (a module may import its own
package and any lower layer):
"""

from __future__ import annotations

import ast
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]

# components/<layer>/ packages and the root modules, bottom to top
LAYERS = [
    # cross-cutting, no project logic
    ("components", "errors", "home", "config", "progress", "memory", "tracking", "runtime"),
    ("components.toy",),            # the synthetic world and the toy base's recipe
    ("components.data",),           # image reading, dataset preparation
    ("components.model",),          # the encoder and the parts of the paper's Figure 2
    ("components.inference",),      # tuning, generation, the engine, export
    ("components.training",),       # whatever changes weights: pre-training on Ray Train, variants, the baselines
    ("components.evaluation",),     # metrics, the harness, evaluate, ablate, the gate
    ("components.serving",),        # registry, pyfunc, serve, the personalize command
    ("components.orchestration",),  # workspaces, locks, DVC, the pipeline report
    ("flows",),                     # Prefect flows and the main job
    ("components.cli",),            # the command line: every stage
]


def layer_of(module: str) -> int:
    for rank, (package, *modules) in enumerate(LAYERS):
        if modules and module in {f"{package}.{m}" for m in modules} | {package}:
            return rank
        if not modules and (module == package or module.startswith(package + ".")):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body."""
    graph: dict[str, set[str]] = {}
    files = sorted((ROOT / "components").rglob("*.py")) + sorted((ROOT / "flows").rglob("*.py"))
    known = {module_name(f) for f in files}
    for path in files:
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                # the longest known module the name refers to (`from components.toy import world` -> .toy.world)
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name and name != "components":
                    targets.add(name)
                elif name == "components" and isinstance(node, ast.ImportFrom) and node.module == "components":
                    targets.add("components")
        graph[module_name(path)] = targets - {module_name(path)}
    return graph


def test_imports_point_down_the_layers():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in project_imports().items() for t in targets
              if t != "components" and layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    graph = project_imports()
    state: dict[str, int] = {}  # 1 visiting, 2 done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]) if target in path else target)
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_every_module_has_a_layer():
    for module in project_imports():
        layer_of(module)


def test_the_model_knows_no_toy_world():
    """The paper's modules work on any base: what they need of one arrives as an argument, never from toy/."""
    toy = [f"{m} imports {t}" for m, targets in project_imports().items() if m.startswith("components.model")
           for t in targets if t.startswith("components.toy")]
    assert not toy, "\n".join(toy)
