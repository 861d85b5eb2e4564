"""The package's import layers: every import of a project module (at module level or inside a
function) goes to a lower layer. The README's architecture section draws the same table."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "megatron_npr"
LAYERS = [  # bottom to top; a unit is a subpackage or a top-level module of megatron_npr
    {"topology", "seeding", "io", "config", "distributed"},
    {"data", "rewards", "kernels"},
    {"models"},
    {"checkpoint"},
    {"rollout"},
    {"sections"},
    {"eval"},
    {"training"},
    {"rl"},
    {"pipeline", "report"},
    {"cli", "cli_train", "launch"},  # entry points: the `npr` command, its training and cluster subcommands
]
ENTRY_POINTS = LAYERS[-1]  # they register and call one another's commands
LAYER = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def project_imports(path: Path, root: Path) -> list[tuple[str, int]]:
    """(imported megatron_npr module, line) of every import statement in the file."""
    module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            found.append((".".join(base + ([node.module] if node.module else [])), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module, node.lineno))
    return [(m, line) for m, line in found if m and m.split(".")[0] == "megatron_npr"]


def upward_imports(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        source = unit_of(".".join(path.relative_to(root.parent).with_suffix("").parts))
        for target, line in project_imports(path, root):
            dest = unit_of(target)
            if dest == "__init__" or dest == source:
                continue
            if source not in LAYER or dest not in LAYER:
                bad.append(f"{path.name}:{line}: {source} or {dest} has no layer in tests/test_layers.py")
            elif LAYER[dest] > LAYER[source] or (LAYER[dest] == LAYER[source]
                                                 and not {source, dest} <= ENTRY_POINTS):
                bad.append(f"{path.relative_to(root.parent)}:{line}: {source} (layer {LAYER[source]}) imports "
                           f"{target} (layer {LAYER[dest]})")
    return bad


def test_no_import_runs_up_a_layer():
    assert upward_imports() == []


def test_the_check_sees_an_upward_import(tmp_path):
    """Negative control, on a copy of the package: models importing checkpoint inside a function
    (the kind of edge this layering removed) is reported."""
    import shutil
    copy = tmp_path / "megatron_npr"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "models" / "probe.py").write_text("def f():\n    from ..checkpoint import read_hf_config\n")
    found = upward_imports(copy)
    assert len(found) == 1 and "models (layer 2) imports megatron_npr.checkpoint (layer 3)" in found[0]
