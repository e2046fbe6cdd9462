"""The wheel carries every package, the CUDA sources and the datasets."""

import pathlib
import subprocess
import sys
import zipfile

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


@pytest.mark.slow
def test_wheel_contains_cuda_sources_and_data(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("kronegp-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in (ROOT / "cuda_ext").glob("*.cu*"):
        assert f"kronegp/_cuda_src/{source.name}" in names
    for data in (ROOT / "kronegp" / "datasets" / "data").glob("*.npz"):
        assert f"kronegp/datasets/data/{data.name}" in names
    assert "kronegp/cli.py" in names
