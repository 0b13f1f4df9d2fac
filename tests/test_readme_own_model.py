"""The README's "Audit your own model" section, executed: its shell commands in order, in a folder
holding what the section says the reader brings (a model file, six photos, class names)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from xai_audit.storage.parquet import ResultsStore

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Audit your own model"
MODEL = """\
from torch import nn


def build() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3),
    )
"""


def section(readme: str) -> str:
    """The text of the section, up to the next heading of its level."""
    start = readme.index(HEADING) + len(HEADING)
    end = readme.find("\n## ", start)
    return readme[start : end if end >= 0 else None]


def fenced(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def shown_in(shown, written) -> bool:
    """Whether every setting ``shown`` (a YAML excerpt) holds in ``written``: mappings may have more keys."""
    if isinstance(shown, dict):
        return isinstance(written, dict) and all(key in written and shown_in(shown[key], written[key]) for key in shown)
    if isinstance(shown, list) and shown and isinstance(shown[0], dict):
        return isinstance(written, list) and len(shown) == len(written) and all(map(shown_in, shown, written))
    return shown == written


def test_the_section_is_under_a_screen_and_shows_init_validate_and_run():
    text = section((REPO / "README.md").read_text())
    commands = [line.split()[:2] for block in fenced(text, "bash") for line in block.splitlines() if line.strip()]
    assert commands == [["xai-audit", "init"], ["xai-audit", "validate"], ["xai-audit", "run"]]
    assert len(text.strip().splitlines()) <= 60


@pytest.mark.slow
def test_the_readme_section_audits_a_model_file_on_photos_and_writes_the_report(tmp_path):
    text = section((REPO / "README.md").read_text())
    (tmp_path / "mymodel.py").write_text(MODEL)
    (tmp_path / "classes.txt").write_text("cat\ncup\nrocket\n")
    (tmp_path / "photos" / "kitchen").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(6):
        folder = tmp_path / "photos" / ("kitchen" if index % 2 else "")
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(folder / f"photo{index}.jpg")
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}", "HOME": str(tmp_path / "home")}

    outputs = []
    for block in fenced(text, "bash"):
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, (block, done.stdout[-3000:], done.stderr[-3000:])
        outputs.append(done.stdout)

    written = yaml.safe_load((tmp_path / "audit.yaml").read_text())
    (excerpt,) = fenced(text, "yaml")
    assert shown_in(yaml.safe_load(excerpt), written), (excerpt, written)
    last = outputs[-1].strip().splitlines()[-1]
    assert last.startswith("report: ")
    report = Path(last.removeprefix("report: "))
    assert report.is_file() and report.is_relative_to(tmp_path / "results" / "reports")
    store = ResultsStore(str(tmp_path / "results"))
    (run_id,) = store.run_ids()
    explained = store.read("saliency", run_id).groupby("method")["image_id"].apply(sorted).to_dict()
    photos = sorted(path.relative_to(tmp_path / "photos").as_posix() for path in (tmp_path / "photos").rglob("*.jpg"))
    assert explained == {method: photos for method in written["explain"]["methods"]}
