"""The documented install of examples/aver provides every package its modules import.

The README says: clone, then ``pip install -e ".[examples]"`` (or the repository's
``make`` venv).  Rather than building a venv in a test, this reads the declared
dependencies from ``pyproject.toml`` (core + the ``examples`` extra) and from
``requirements-dev.txt``, and compares them with the imports found by parsing every
module under ``examples/aver`` (``ast``, so imports inside functions count too).
A new import without a declared distribution fails here, and so does a
declared example dependency that nothing imports any more.
"""

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")

ROOT = Path(__file__).resolve().parents[1]
AVER = ROOT / "examples" / "aver"

# Import name -> distribution name, for every third-party module the example may use.
# An import missing here fails the test: add it here and to the extra (if it earns it).
DISTRIBUTION = {
    "torch": "torch", "numpy": "numpy", "fbp_kernels": "fbp-kernels",
    "matplotlib": "matplotlib", "tqdm": "tqdm", "cv2": "opencv-python-headless",
    "torchvision": "torchvision",
}


def requirement_name(req: str) -> str:
    """``"opencv-python-headless>=4.8,<5  # why"`` -> ``"opencv-python-headless"``."""
    return re.split(r"[\s<>=!~;\[#]", req.strip(), maxsplit=1)[0].lower()


def example_imports() -> dict:
    """Top-level module name -> files importing it, over all of examples/aver."""
    found = {}
    for path in sorted(AVER.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(path.name)
    return found


def third_party(imports: dict) -> dict:
    return {m: f for m, f in imports.items()
            if m not in sys.stdlib_module_names and m not in ("aver", "__future__")}


def test_every_example_import_is_declared_by_the_examples_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {requirement_name(r) for r in project["dependencies"]}
    declared |= {requirement_name(r) for r in project["optional-dependencies"]["examples"]}
    declared.add("fbp-kernels")  # the package itself, installed by `pip install -e .`
    used = third_party(example_imports())
    assert {"torch", "cv2", "torchvision", "matplotlib"} <= set(used), \
        "the parser found too few imports for this check to mean anything"
    unknown = {m: sorted(f) for m, f in used.items() if m not in DISTRIBUTION}
    assert not unknown, f"imports with no known distribution (add to DISTRIBUTION and the " \
                        f"extra): {unknown}"
    undeclared = {DISTRIBUTION[m]: sorted(f) for m, f in used.items()
                  if DISTRIBUTION[m] not in declared}
    assert not undeclared, f"not installed by pip install -e '.[examples]': {undeclared}"
    # ... and the extra lists nothing the example does not import.
    extra = {requirement_name(r) for r in project["optional-dependencies"]["examples"]}
    unused = extra - {DISTRIBUTION[m] for m in used}
    assert not unused, f"the examples extra declares packages nothing imports: {unused}"


def test_the_make_venv_has_the_examples_packages_too():
    # README's second install path: `make setup` builds .venv from requirements-dev.txt.
    lines = [l for l in (ROOT / "requirements-dev.txt").read_text().splitlines()
             if l.strip() and not l.lstrip().startswith("#")]
    dev = {requirement_name(l) for l in lines}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = {requirement_name(r) for r in project["optional-dependencies"]["examples"]}
    assert extra <= dev, f"requirements-dev.txt lacks {sorted(extra - dev)}"


@pytest.mark.parametrize("module", sorted(p.stem for p in AVER.glob("*.py")))
def test_every_example_module_imports(module):
    # In this (dev) environment every declared package is present, so a failure here is
    # the module itself (syntax, a renamed name), not a missing install.
    examples = str(ROOT / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    name = "aver" if module == "__init__" else f"aver.{module}"
    importlib.import_module(name)
