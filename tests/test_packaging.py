"""What `pip install .` puts into site-packages: one import package, ``xai_audit``, that carries its
own configs and deployment template, and works beside a user's ``tasks.py``, ``storage.py`` and
``flows/`` package on ``PYTHONPATH=.`` (the names the repository's top-level folders would take).
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tomllib
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGED_FOLDERS = ("flows", "tasks", "storage", "examples")
"""The repository folders that install under ``xai_audit``; tests/ and benchmarks/ stay out."""
SIX_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "camera", "immunohistochemistry")
TINY_MODEL = """\
from torch import nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    )
"""


def test_the_packages_list_covers_every_subpackage_of_the_installed_folders():
    """A new subpackage missing from pyproject's explicit list would be silently left out of the wheel."""
    on_disk = {"xai_audit"} | {
        ".".join(("xai_audit", *init.parent.relative_to(REPO).parts))
        for folder in PACKAGED_FOLDERS
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == on_disk


def test_package_data_ships_every_config_and_the_deployment_template():
    """Everything under configs/ (the demo, the examples' files) and deployments/prefect.yaml."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["xai_audit"]
    wanted = [path for path in (REPO / "configs").rglob("*") if path.is_file()] + [REPO / "deployments/prefect.yaml"]
    shipped = {path for path in wanted if any(fnmatch.fnmatch(path.relative_to(REPO).as_posix(), p) for p in patterns)}
    assert shipped == set(wanted)


def run(command: list, **options) -> subprocess.CompletedProcess:
    """``command`` run to completion; a failure shows its output."""
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, **options)
    assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
    return done


def write_photos(folder: Path) -> None:
    """Six small JPEGs of scikit-image's bundled photographs."""
    import skimage.data

    folder.mkdir()
    for name in SIX_PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        Image.fromarray(pixels).convert("RGB").resize((96, 72)).save(folder / f"{name}.jpg")


def build_wheel(tmp_path: Path) -> Path:
    """The wheel of a copy of this checkout, built by the test venv's pip and setuptools (offline)."""
    source = tmp_path / "source"
    local = {".venv", ".git", ".cache", "results", "build"}  # the checkout's own, at its top only

    def ignored(folder: str, names: list[str]) -> set[str]:
        return {
            n for n in names if n == "__pycache__" or n.endswith(".egg-info") or (folder == str(REPO) and n in local)
        }

    shutil.copytree(REPO, source, ignore=ignored)
    wheels = tmp_path / "wheels"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
        + ["-w", wheels, source],
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("xai_audit-*.whl")
    return wheel


def fresh_venv(folder: Path) -> Path:
    """A venv without pip whose dependencies come from the test venv's site-packages folders, added as
    plain path lines: their .pth files (the editable install of this checkout) are not run."""
    run([sys.executable, "-m", "venv", "--without-pip", folder])
    python = folder / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    dependencies = [path for path in sys.path if path.endswith("site-packages")]
    Path(site, "test_venv_dependencies.pth").write_text("\n".join(dependencies) + "\n")
    return python


@pytest.mark.slow
def test_the_wheel_installs_one_package_that_audits_a_model_file_beside_generic_names(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (top_level,) = [name for name in names if name.endswith(".dist-info/top_level.txt")]
        assert archive.read(top_level).decode().split() == ["xai_audit"]
        assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"xai_audit"}
        assert archive.read("xai_audit/configs/demo.yaml") == (REPO / "configs" / "demo.yaml").read_bytes()

    python = fresh_venv(tmp_path / "venv")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel])
    package = Path(
        run([python, "-c", "import xai_audit; print(xai_audit.__file__)"], cwd=tmp_path).stdout.strip()
    ).parent
    assert package.is_relative_to(tmp_path / "venv")
    site = package.parent
    assert not any((site / name).exists() for name in ("tasks", "flows", "storage", "examples", "configs"))

    # deployments/prefect.yaml's entrypoint and default config resolve in the installed package folder
    # (the working directory `xai-audit deploy` gives the workers)
    deployments = yaml.safe_load((package / "deployments" / "prefect.yaml").read_text())["deployments"]
    for deployment in deployments:
        assert (package / deployment["entrypoint"].split(":")[0]).is_file()
        assert (package / deployment["parameters"]["config_path"]).read_bytes() == (
            REPO / "configs" / "demo.yaml"
        ).read_bytes()

    project = tmp_path / "project"  # a user's automation project: generic module names on PYTHONPATH=.
    (project / "flows").mkdir(parents=True)
    (project / "flows" / "__init__.py").write_text("")
    (project / "tasks.py").write_text("def nightly():\n    pass\n")
    (project / "storage.py").write_text("BUCKET = 's3://nowhere'\n")
    (project / "mymodel.py").write_text(TINY_MODEL)
    (project / "classes.txt").write_text("cat\ncup\nrocket\n")
    write_photos(project / "photos")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "PYTHON"))}
    env |= {
        "PYTHONPATH": ".",
        "PATH": f"{python.parent}{os.pathsep}{env['PATH']}",
        "HOME": str(tmp_path / "home"),
        "XAI_AUDIT_CACHE": str(tmp_path / "cache"),
    }
    script = python.parent / "xai-audit"
    assert script.read_text().startswith(f"#!{python}")

    def xai_audit(*args: str) -> subprocess.CompletedProcess:
        return run([script, *args], cwd=project, env=env, timeout=480)

    xai_audit("init", "--model", "mymodel.py:build", "--images", "photos/", "--classes", "classes.txt", "--size", "64")
    assert "valid" in xai_audit("validate", "audit.yaml").stdout
    ran = xai_audit("run", "audit.yaml")
    report = Path(ran.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert report.is_file() and report.is_relative_to(project / "results")
    # the real-photos example writes its photos into the cache, never into the installed package
    example = run([python, "-m", "xai_audit.examples.real_photos"], cwd=project, env=env).stdout
    photo_list = Path(example.strip().removeprefix("image list: "))
    assert photo_list.is_file() and photo_list.is_relative_to(tmp_path / "cache")
    assert not list(package.rglob("*.png"))
    listed = xai_audit("query", "select image_id from predictions order by image_id", "--format", "csv").stdout.split()
    assert listed == ["image_id", *sorted(f"{name}.jpg" for name in SIX_PHOTOS)]
    assert "Traceback" not in ran.stderr
