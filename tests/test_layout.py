"""The package's imports run one way: no module cycle, and no sub-package reaching up to a later layer."""

import ast
from pathlib import Path

import crystallm

PACKAGE = Path(crystallm.__file__).parent

# From the bottom up; a module may import its own layer and those below it. Evaluation sits below generation:
# the run folder scores structures as it writes them, and evaluation needs no model.
LAYERS = [
    {"errors", "symmetry", "validity", "compute", "stage_config"},
    {"io"},
    {"tokenization", "configuration", "modeling", "model_folder", "adapters", "diffraction", "refinement"},
    {"data"},
    {"evaluation"},
    {"generation"},
    {"properties"},
    {"training", "refinement.training"},
    {"design", "hub", "model_card"},
    {"cli"},
]


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST, package: Path) -> set[str]:
    """crystallm modules imported anywhere in a module (functions included), except under `if TYPE_CHECKING`."""
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("crystallm"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crystallm"):
            for alias in node.names:  # `from crystallm.io import text_format` imports a module
                submodule = f"{node.module}.{alias.name}"
                path = package.parent / submodule.replace(".", "/")
                known = path.with_suffix(".py").exists() or path.is_dir()
                found.add(submodule if known else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    graph = {}
    for path in sorted(package.rglob("*.py")):
        graph[_module_name(path, package)] = _runtime_imports(ast.parse(path.read_text()), package)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}

    def walk(module, trail):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if target == module or target not in graph:
                continue
            if state.get(target) == "open":
                return trail[trail.index(target):] + [target]
            if target not in state and (cycle := walk(target, trail + [target])):
                return cycle
        state[module] = "done"
        return None

    for module in graph:
        if module not in state and (cycle := walk(module, [module])):
            return cycle
    return None


def _layer(module: str) -> int:
    """The layer of a module: that of its longest dotted prefix named in LAYERS (a package's module may sit in
    another layer than the package, as refinement.training does)."""
    parts = module.split(".")[1:]
    for length in range(len(parts), 0, -1):
        name = ".".join(parts[:length])
        for index, names in enumerate(LAYERS):
            if name in names:
                return index
    raise AssertionError(f"{module} is in no layer of LAYERS")


def test_no_import_cycle_inside_crystallm():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    # The check above must be able to fail: a package where a imports b (inside a function) and b imports a.
    package = tmp_path / "crystallm"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from crystallm import b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nimport crystallm.a\n")
    assert find_cycle(import_graph(package)) == ["crystallm.a", "crystallm.b", "crystallm.a"]
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import crystallm.a\n")
    assert find_cycle(import_graph(package)) is None


def test_imports_run_one_way_through_the_layers():
    upward = [f"{module} -> {target}" for module, targets in import_graph().items() if module != "crystallm"
              for target in targets if target != "crystallm" and _layer(target) > _layer(module)]
    assert upward == []


def test_the_code_passes_ruff():
    """The lint the README's test command runs, so CI lints (rules and line length in pyproject.toml)."""
    import subprocess
    import sys

    root = Path(crystallm.__file__).resolve().parents[1]
    folders = [name for name in ("crystallm", "tests", "train", "eval", "tokenizer", "scripts")
               if (root / name).is_dir()]
    found = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", *folders], cwd=root,
                           capture_output=True, text=True)
    assert found.returncode == 0, found.stdout + found.stderr
