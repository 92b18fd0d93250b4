"""kd's layers: imports go one way (config < data < models < distill < train; deploy and eval beside train), with no
cycle, function-local imports included, and the training loop imports nothing of distillation."""

import ast
import collections
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LEVEL = {"kd": 0, "data": 1, "models": 2, "distill": 3, "train": 4, "deploy": 4, "eval": 4}


def module_graph() -> dict[str, set[str]]:
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
        for p in (ROOT / "kd").rglob("*.py")
    }
    graph = collections.defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):  # every import, at the top or inside a function
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "kd"


def test_imports_go_one_way_and_the_loop_knows_nothing_of_distillation():
    wrong = [
        (a, b)
        for a, targets in module_graph().items()
        for b in targets
        if LEVEL[package(b)] > LEVEL[package(a)]
        or (package(a), package(b)) in {("deploy", "train"), ("eval", "train"), ("train", "eval"), ("deploy", "eval")}
    ]
    assert wrong == []


def test_there_is_no_import_cycle():
    graph, done, active, cycles = module_graph(), set(), [], []

    def visit(module: str) -> None:
        active.append(module)
        for target in graph[module]:
            if target in active:
                cycles.append(active[active.index(target) :])
            elif target not in done:
                visit(target)
        active.pop()
        done.add(module)

    for module in list(graph):
        if module not in done:
            visit(module)
    assert cycles == []
