"""pyproject names every package (the wheel's contents: tests/test_datasets.py)."""

import pathlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")


def declared_packages():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return set(config["packages"]), config.get("package-dir", {})


def test_package_list_names_every_package():
    packages, mapping = declared_packages()
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "kronegp").rglob("__init__.py")
    }
    assert found <= packages, f"add to pyproject's packages: {sorted(found - packages)}"
    assert mapping == {"kronegp._cuda_src": "cuda_ext"}
