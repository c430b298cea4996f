"""Structure rules of the code base, checked on every run."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [*ROOT.joinpath("src").rglob("*.py"), *ROOT.joinpath("tests").rglob("*.py"),
           *ROOT.joinpath("bench").rglob("*.py")]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_another_modules_private_names():
    bad = []
    for f in SOURCES:
        tree = ast.parse(f.read_text())
        quicknat_modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level > 0 or (node.module or "").startswith("quicknat")):
                bad += [f"{f.name}:{node.lineno} {a.name}" for a in node.names if _private(a.name)]
                quicknat_modules |= {a.asname or a.name for a in node.names}
            elif isinstance(node, ast.Import):
                quicknat_modules |= {(a.asname or a.name).split(".")[0] for a in node.names
                                     if a.name.startswith("quicknat")}
        for node in ast.walk(tree):  # module._private through an imported quicknat module
            if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in quicknat_modules and node.value.id not in ("self", "cls")):
                bad.append(f"{f.name}:{node.lineno} {node.value.id}.{node.attr}")
    assert not bad, bad


def test_no_view_branching_outside_the_view_table():
    # view names are data of quicknat.views; other modules look them up, never branch on them
    bad = []
    for f in ROOT.joinpath("src").rglob("*.py"):
        if f.name == "views.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value in ("coronal", "axial", "sagittal")
                    for c in node.comparators):
                bad.append(f"{f.name}:{node.lineno}")
    assert not bad, bad


def test_functions_and_modules_stay_readable():
    """No function in src/ over 80 lines; no module over 400 lines except the label table."""
    long_functions, long_modules = [], []
    for f in ROOT.joinpath("src").rglob("*.py"):
        text = f.read_text()
        if text.count("\n") > 400 and f.name != "labels.py":
            long_modules.append(f"{f.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{f.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert not long_functions and not long_modules, (long_functions, long_modules)
