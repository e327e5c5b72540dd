"""The package's structure: dependencies point one way, and architecture knowledge lives in the
model adapters."""

import ast
import re
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "icm_lab"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    """Every `icm_lab` import of every module, at module level or inside a function."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph.add_edges_from((name, t) for t in targets if t in modules and t != name)
    return graph


def test_no_import_cycle_inside_the_package():
    cycles = list(nx.simple_cycles(import_graph()))
    assert cycles == [], cycles


def test_stages_sit_between_the_runner_and_the_resources():
    graph = import_graph()
    stages = [m for m in graph if m.startswith("icm_lab.stages.")]
    assert stages
    for stage in stages:
        assert not nx.has_path(graph, stage, "icm_lab.runner"), stage
        assert nx.has_path(graph, "icm_lab.runner", stage)
    assert not any(nx.has_path(graph, "icm_lab.resources", stage) for stage in stages)


def test_module_paths_are_known_only_to_the_adapters():
    """No module outside models/adapters.py spells a diffusers module path pattern."""
    pattern = re.compile(r"(down|up)_blocks\.|mid_block\.|transformer_blocks\.|caption_projection"
                         r"|removesuffix\(\"attn|replace\(\"attn")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("adapters.py", "tiny.py", "train.py"):  # builders make the modules
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code) and not code.strip().startswith(('"', "'", "`")):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == [], offenders
