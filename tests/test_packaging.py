"""The distribution installs one import root, `flywheel`, and nothing with a generic top-level name."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_has_one_import_root(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", ".flywheel", "build", "*.gguf",
                                                             "Modelfiles", "bench", "tests", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("flywheel-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"flywheel"}
    # every layer is inside it, with the dashboard's page scripts (run by path, so package data)
    for pkg in ("foundation", "mining", "training", "evals/ab", "evals/embeddings", "evals/prompts", "pipelines",
                "dashboard"):
        assert f"flywheel/{pkg}/__init__.py" in names, pkg
    assert "flywheel/dashboard/pages/overview.py" in names
    assert "flywheel/evals/prompts/demo_cases.yaml" in names
