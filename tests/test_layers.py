"""The package's layers import only downwards (the README's layout section):

    config -> models / data -> methods -> eval -> engine -> run building (runconfig) -> cli

Every import of a vitcl module is checked, lazy imports inside functions and TYPE_CHECKING blocks included.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "vitcl"

# first component of a module path inside the package -> its layer; modules of one layer may import each other
# only where SIBLINGS allows it (models and data share a layer but know nothing of each other)
LAYERS = {
    "errors": 0, "registry": 0, "config": 0,
    "models": 1, "data": 1,
    "methods": 2,
    "eval": 3,
    "engine": 4,
    "runconfig": 5,
    "bench": 5.5,  # run building: a method's step on random images, for `vitcl bench`
    "sweep": 5.5,  # run building: grids of runs and their report
    "api": 5.7,  # vitcl.run / load_run / report: below the command line, which shares its run setup
    "cli": 6, "__main__": 7, "__init__": 7,
}
SIBLINGS = {"errors": {"errors"}, "registry": {"errors", "registry"},
            "config": {"errors", "config"}}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, module path inside the package) for every import of a vitcl module in the file (or in `source`,
    read as if it were that file)."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    is_package = path.name == "__init__.py"
    here = module_name(path).split(".")
    package = here if is_package else here[:-1]
    if module_name(path) == "__init__":
        package = []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name[len("vitcl."):]) for a in node.names if a.name.startswith("vitcl.")]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and (node.module == "vitcl" or node.module.startswith("vitcl.")):
                    base = node.module[len("vitcl."):] if node.module != "vitcl" else ""
                else:
                    continue
            else:
                up = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:  # a name is a submodule when a file or package of that name exists
                sub = f"{base}.{a.name}" if base else a.name
                is_module = any((PACKAGE / sub.replace(".", "/")).with_suffix(s).exists() for s in (".py", ""))
                out.append((node.lineno, sub if is_module or not base else base))
    return sorted(set(out))


def top(module: str) -> str:
    return module.split(".")[0] or "__init__"


def violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = top(module_name(path))
        for line, target in imported_modules(path):
            other = top(target)
            if other not in LAYERS:
                bad.append(f"{path.relative_to(PACKAGE)}:{line}: imports {target}, a module with no layer")
                continue
            if me == other:
                continue
            allowed = LAYERS[other] < LAYERS[me] or (me in SIBLINGS and other in SIBLINGS[me])
            if not allowed:
                bad.append(f"{path.relative_to(PACKAGE)}:{line}: {me} (layer {LAYERS[me]}) imports {target} "
                           f"(layer {LAYERS[other]})")
    return bad


def test_every_package_module_has_a_layer():
    tops = {top(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert tops <= set(LAYERS), f"modules without a layer: {sorted(tops - set(LAYERS))}"


def test_imports_go_only_downwards():
    bad = violations()
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize("source,expected", [
    ("from ..engine.trainer import Trainer\n", "engine.trainer"),
    ("def f():\n    from ..eval import locality\n", "eval.locality"),
    ("import vitcl.cli\n", "cli"),
    ("from vitcl import runconfig\n", "runconfig"),
])
def test_the_parser_sees_every_kind_of_import(source, expected):
    # read as if it were vitcl/models/probe.py: each import is found, and each goes against the layers
    probe = PACKAGE / "models" / "probe.py"
    found = [m for _, m in imported_modules(probe, source)]
    assert found == [expected]
    assert LAYERS[top(expected)] > LAYERS["models"]
