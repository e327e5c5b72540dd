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


# The layers, lowest first. A module imports only from its own folder or a lower layer; folders
# on one layer do not import each other. docs/architecture.md draws the same tree.
LAYERS: list[set[str]] = [
    {"core"},
    {"io", "config"},
    {"models", "toy"},
    {"probing", "engine", "labeling"},
    {"steering", "evaluation", "report"},
    {"stages"},
    {"app"},
    {"tools"},
]
RANK = {folder: rank for rank, folders in enumerate(LAYERS) for folder in folders}


def folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else ""  # "": the package root


def test_every_module_sits_in_a_layer_folder():
    roots = ("icm_lab", "icm_lab.__main__")
    loose = [m for m in import_graph() if folder(m) not in RANK and m not in roots]
    assert loose == [], f"modules outside the layer folders: {loose}"
    assert set(RANK) == {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}


def test_imports_point_down_the_layers():
    graph = import_graph()
    upward = []
    for source, target in graph.edges:
        a, b = folder(source), folder(target)
        if not a or not b or a == b:
            continue  # the package root and __main__ sit outside the layers; a folder's own modules
        if RANK[b] >= RANK[a]:
            upward.append(f"{source} -> {target}")
    assert upward == [], upward


def test_nothing_on_the_run_path_imports_the_tools():
    graph = import_graph()
    for module in graph:
        if folder(module) != "tools":
            assert not any(folder(t) == "tools" for t in graph.successors(module)), module


def test_stages_sit_between_the_runner_and_the_resources():
    graph = import_graph()
    shared = ("icm_lab.stages.resources", "icm_lab.stages.components")  # what stages use
    stages = [m for m in graph if m.startswith("icm_lab.stages.") and m not in shared]
    assert stages
    for stage in stages:
        assert not nx.has_path(graph, stage, "icm_lab.app.runner"), stage
        assert nx.has_path(graph, "icm_lab.app.runner", stage)
    assert not any(nx.has_path(graph, service, stage) for service in shared for stage in stages)


def test_module_paths_are_known_only_to_the_adapters():
    """No module outside models/adapters.py spells a diffusers module path pattern."""
    pattern = re.compile(r"(down|up)_blocks\.|mid_block\.|transformer_blocks\.|caption_projection"
                         r"|removesuffix\(\"attn|replace\(\"attn")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in ("adapters.py", "tiny.py", "toy_train.py"):  # builders make the modules
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if pattern.search(code) and not code.strip().startswith(('"', "'", "`")):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == [], offenders


def test_every_module_compiles_without_warnings():
    """Python 3.12 (the GPU machine's) warns of invalid escapes that 3.11 accepts silently."""
    import warnings

    for path in PACKAGE.rglob("*.py"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(), str(path), "exec")


def test_no_private_api_of_another_library():
    """Only public APIs: no `_internal` modules, no private attributes of numpy, diffusers or
    torch modules, no poking into instance dictionaries."""
    pattern = re.compile(r"\._internal\b|\._mmap\b|_diffusers_hook|__dict__\[|__dict__\.pop")
    offenders = [f"{path.relative_to(PACKAGE)}:{number}"
                 for path in PACKAGE.rglob("*.py")
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line.split("#")[0])]
    assert offenders == [], offenders


def test_no_test_code_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "unittest" not in text and "ICM_TEST_" not in text, path


def test_every_stage_is_registered_by_its_own_module():
    """The runner runs the graph from the registry; each stage module registers its stage."""
    import icm_lab.app.runner  # noqa: F401  (imports the stage modules, which register)
    from icm_lab.config.schema import SECTIONS, STAGES
    from icm_lab.stages.registry import STAGES as REGISTRY

    assert set(REGISTRY) == set(STAGES)
    for name, stage in REGISTRY.items():
        assert stage.run.__module__ == f"icm_lab.stages.{name}", name
        assert stage.section is None or stage.section in SECTIONS, name
