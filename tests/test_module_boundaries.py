"""The house rules that keep modules apart, read from the source (``ast``) of every module of
kronegp:

* only the device door (:mod:`kronegp.device`), :mod:`kronegp.ops` and ``kronegp._cuda`` itself
  import ``kronegp._cuda``;
* nobody probes a backend with ``hasattr``: the door's capabilities say what a backend has;
* no private name (``_x``, or a name from a private module) is imported, or read as an
  attribute of an imported module, across a package boundary, nor from the doors
  (:mod:`kronegp.device`, :mod:`kronegp.ops`) by any other module.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "kronegp"
#: the modules that may import the CUDA backend
CUDA_DOOR = {"kronegp.device", "kronegp.ops"}


@dataclass(frozen=True)
class Module:
    name: str  # dotted
    package: str  # the package it belongs to (itself for an __init__)
    tree: ast.Module
    path: Path


def _modules() -> list[Module]:
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        if is_init:
            parts = parts[:-1]
        name = ".".join(parts)
        package = name if is_init else ".".join(parts[:-1])
        out.append(Module(name, package, ast.parse(path.read_text(), str(path)), path))
    return out


MODULES = _modules()
MODULE_NAMES = {m.name for m in MODULES}


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _package_of(target: str) -> str:
    """The package a dotted module belongs to (a package is its own)."""
    return target if _is_package(target) else target.rpartition(".")[0]


def _is_package(target: str) -> bool:
    return (ROOT.parent / target.replace(".", "/") / "__init__.py").exists()


def _resolve(mod: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: Module):
    """``(line, imported module, name or None)`` for every import in ``mod`` of a kronegp module
    (``from a import b`` where ``a.b`` is a module counts as importing module ``a.b``)."""
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "kronegp":
                    yield node.lineno, alias.name, None, alias.asname or alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(mod, node)
            if source.split(".")[0] != "kronegp":
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in MODULE_NAMES:
                    yield node.lineno, sub, None, alias.asname or alias.name
                else:
                    yield node.lineno, source, alias.name, alias.asname or alias.name


def _crosses(mod: Module, target: str) -> bool:
    """Whether ``mod`` reaching into ``target`` crosses a boundary: another package, or the
    internals of a door (:data:`CUDA_DOOR`: nobody else, not even its own package, reads them)."""
    return _package_of(target) != mod.package or (target in CUDA_DOOR and target != mod.name)


def _private_module(target: str) -> bool:
    return any(_private(p) for p in target.split(".")[1:])


def test_only_the_door_imports_the_cuda_backend():
    bad = []
    for mod in MODULES:
        if mod.name in CUDA_DOOR or mod.name.startswith("kronegp._cuda"):
            continue
        for line, target, _, _ in _imports(mod):
            if target == "kronegp._cuda" or target.startswith("kronegp._cuda."):
                bad.append(f"{mod.path.name}:{line} imports {target}")
    assert not bad, "only kronegp.device and kronegp.ops may import kronegp._cuda:\n" + "\n".join(bad)


def test_no_backend_is_probed_with_hasattr():
    bad = []
    for mod in MODULES:
        for node in ast.walk(mod.tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
                    and node.args and "backend" in ast.unparse(node.args[0]).lower()):
                bad.append(f"{mod.path.relative_to(ROOT.parent)}:{node.lineno} {ast.unparse(node)}")
    assert not bad, "ask the backend's capability (kronegp.device.Capability) instead:\n" + "\n".join(bad)


def test_no_private_name_crosses_a_package_boundary():
    bad = []
    for mod in MODULES:
        bound: dict[str, str] = {}  # local names bound to imported kronegp modules
        for line, target, name, local in _imports(mod):
            if name is None:
                bound[local] = target
            # the door may reach the private CUDA package (the test above limits who does)
            door = mod.name in CUDA_DOOR and target.startswith("kronegp._cuda")
            if not _crosses(mod, target) or door:
                continue
            if _private_module(target) or (name is not None and _private(name)):
                bad.append(f"{mod.name}:{line} imports {target}{'.' + name if name else ''}")
        for node in ast.walk(mod.tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and _private(node.attr)):
                target = bound[node.value.id]
                if target == "kronegp" or _crosses(mod, f"{target}.{node.attr}" if _is_package(target) else target):
                    bad.append(f"{mod.name}:{node.lineno} reads {target}.{node.attr}")
    assert not bad, "make these public in their own package, or move them:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("rule", ["door", "hasattr", "private"])
def test_the_rules_catch_what_they_forbid(tmp_path, rule, monkeypatch):
    # Each rule must fail on an example of what it forbids (a test that cannot fail proves nothing).
    source = {
        "door": "from kronegp._cuda.cg import CG_MAX_COLUMNS\n",
        "hasattr": "def f(backend):\n    return hasattr(backend, 'cg_step')\n",
        "private": ("from kronegp import device, linalg\nfrom kronegp.ops import _raw_kron_matmul\n"
                    "x = linalg._starts\ny = device._cuda_state\n"),
    }[rule]
    fake = Module("kronegp.solvers.example", "kronegp.solvers", ast.parse(source), ROOT / "solvers" / "example.py")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", [fake])
    test = {"door": test_only_the_door_imports_the_cuda_backend, "hasattr": test_no_backend_is_probed_with_hasattr,
            "private": test_no_private_name_crosses_a_package_boundary}[rule]
    with pytest.raises(AssertionError) as err:
        test()
    if rule == "private":
        for name in ("_raw_kron_matmul", "linalg._starts", "device._cuda_state"):
            assert name in str(err.value)


def test_the_doors_internals_are_theirs_even_within_their_package(monkeypatch):
    source = "from kronegp import device\nx = device._cuda_state\n"
    fake = Module("kronegp.linalg", "kronegp", ast.parse(source), ROOT / "linalg.py")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", [fake])
    with pytest.raises(AssertionError, match="device._cuda_state"):
        test_no_private_name_crosses_a_package_boundary()
