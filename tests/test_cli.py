"""The command line: help everywhere, exit codes, query formats, and a clean offline run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from xai_audit.flows.cli import build_parser, main
from xai_audit.storage.parquet import ResultsStore
from xai_audit.storage.runs import RunRecord

REPO = Path(__file__).resolve().parents[1]
COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"] if command is None else [command, "--help"])
    assert exited.value.code == 0
    assert "usage: xai-audit" in capsys.readouterr().out


def test_help_and_config_errors_never_import_torch_prefect_or_open_clip(tmp_path):
    """`--help` of every command and `validate` of a config the schema rejects, or that names an
    unknown method, source or similarity, answer before the heavy imports (a fresh interpreter, so
    nothing earlier in the suite has imported them); the registered names come from xai_audit.tasks.core.names."""
    from xai_audit.flows.cli import build_parser

    schema = tmp_path / "schema.yaml"
    schema.write_text("seed: abc\n")
    names = tmp_path / "names.yaml"
    names.write_text(
        "models: [{name: m, source: hub}]\n"
        "explain: {methods: [gradcam, telepathy]}\n"
        "dissect: {clip: {similarity: cos}}\n"
    )
    commands = [name for name in build_parser()._subparsers._group_actions[0].choices if name != "world"]
    probe = (
        "import sys, json\nfrom xai_audit.flows.cli import main\n"
        "codes = []\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    try:\n        codes.append(main(argv))\n"
        "    except SystemExit as exit:\n        codes.append(exit.code)\n"
        "heavy = sorted(name for name in ('torch', 'prefect', 'open_clip', 'torchvision') if name in sys.modules)\n"
        "print(codes, heavy, file=sys.stderr)\n"
    )
    argvs = [["--help"], ["world", "--help"], ["world", "make", "--help"], *([name, "--help"] for name in commands)]
    argvs += [["validate", str(schema)], ["validate", str(names)]]
    finished = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(argvs)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    expected = [0] * (len(argvs) - 2) + [2, 2]
    assert finished.stderr.strip().splitlines()[-1] == f"{expected} []", finished.stderr
    assert "seed:" in finished.stderr
    for field, valid in (
        ("explain.methods", "scorecam"),
        ("models.0.source", "torchvision"),
        ("dissect.clip.similarity", "soft_wpmi"),
    ):
        assert any(line.strip().startswith(f"{field}:") and valid in line for line in finished.stderr.splitlines()), (
            field
        )


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["frobnicate"])
    assert exited.value.code == 2


@pytest.fixture()
def results_with_errors(tmp_path):
    store = ResultsStore(tmp_path)
    store.write(
        "errors",
        "r1",
        "u",
        [{"stage": "explain", "item_id": f"img{i}.png", "error_type": "E", "message": "m"} for i in range(3)],
    )
    RunRecord(run_id="r1", config_name="c", config_json="{}", config_hash="h", device="cpu").save(store)
    return tmp_path


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_query_prints_each_format(results_with_errors, fmt, capsys):
    assert (
        main(
            [
                "query",
                "--results",
                str(results_with_errors),
                "--format",
                fmt,
                "select item_id from errors order by item_id",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    if fmt == "csv":
        assert out.splitlines() == ["item_id", "img0.png", "img1.png", "img2.png"]
    elif fmt == "json":
        assert [row["item_id"] for row in json.loads(out)] == ["img0.png", "img1.png", "img2.png"]
    else:
        assert out.split() == ["item_id", "img0.png", "img1.png", "img2.png"]


def test_query_to_parquet_needs_and_writes_an_output(results_with_errors, tmp_path, capsys):
    assert main(["query", "--results", str(results_with_errors), "--format", "parquet", "select * from errors"]) == 2
    target = tmp_path / "out.parquet"
    assert (
        main(
            [
                "query",
                "--results",
                str(results_with_errors),
                "--format",
                "parquet",
                "--output",
                str(target),
                "select * from errors",
            ]
        )
        == 0
    )
    assert len(pd.read_parquet(target)) == 3


def test_bad_sql_is_a_usage_error(results_with_errors, capsys):
    assert main(["query", "--results", str(results_with_errors), "select * from nowhere"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_runs_lists_status(results_with_errors, capsys):
    assert main(["runs", "--results", str(results_with_errors), "--format", "json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    assert (run["run_id"], run["status"]) == ("r1", "running")


def test_offline_cli_run_is_clean_and_exits_3_on_failed_items(tmp_path):
    """A real subprocess run: exit 3 (one broken image; AblationCAM raises on the second model,
    which refuses forwards of more than 8 images), every other map kept, the reasons in the digest,
    no Prefect noise."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for index in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{index}.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "cli-tiny",
                "models": [
                    {
                        "name": "tiny",
                        "source": "python",
                        "callable": "tests.fixtures.tiny_models:tiny_resnet",
                        "num_classes": 3,
                        "preprocess": {"resize": 64, "crop": 64},
                    },
                    {
                        "name": "bound",
                        "source": "python",
                        "callable": "tests.fixtures.tiny_models:batch_limited_cnn",
                        "num_classes": 3,
                        "cam_layer": "features.2",
                        "preprocess": {"resize": 64, "crop": 64},
                    },
                ],
                "images": {"kind": "folder", "root": "images"},
                "dissect": {"enabled": False},
                "explain": {"methods": ["gradcam", "ablationcam"], "chunk_size": 2, "metrics": {"batch_size": 8}},
            }
        )
    )
    env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    results = tmp_path / "results"
    command = [sys.executable, "-m", "xai_audit.flows.cli", "run", str(config), "--results", str(results)]
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 3, finished.stderr
    for noise in ("Traceback", "ERROR", "Error flushing", "telemetry", "Exception"):
        assert noise not in finished.stderr, finished.stderr
    assert "item(s) failed" in finished.stdout
    assert "explain ValueError (bound): ablationcam failed on" in finished.stdout  # the digest names the reason
    count = subprocess.run(
        [
            sys.executable,
            "-m",
            "xai_audit.flows.cli",
            "query",
            "--results",
            str(results),
            "--format",
            "csv",
            "select count(*) as n from saliency",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert count.returncode == 0 and int(count.stdout.splitlines()[1]) == 3 * 3  # tiny: 2 maps, bound: gradcam only


def test_validate_without_a_config_reads_the_shipped_demo(capsys):
    from xai_audit.flows.cli import DEMO

    assert main(["validate"]) == 0
    assert capsys.readouterr().out.startswith(f"{DEMO}: valid (1 model(s)")
    assert DEMO.read_bytes() == (REPO / "configs" / "demo.yaml").read_bytes()


def _own_model_folder(folder: Path) -> None:
    (folder / "photos").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(folder / "photos" / "a.png")
    (folder / "mymodel.py").write_text("from torch import nn\n\ndef build():\n    return nn.Linear(1, 2)\n")
    (folder / "classes.txt").write_text("cat\ndog\n")


def test_init_writes_an_explain_only_config_of_the_model_file_beside_it(tmp_path, monkeypatch, capsys):
    from xai_audit.tasks.core.config import load_config

    _own_model_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["init", "--model", "mymodel.py:build", "--images", "photos/", "--classes", "classes.txt"]
    assert main(args) == 0
    config = load_config(tmp_path / "audit.yaml")
    (model,) = config.models
    assert (model.name, model.source, model.callable) == ("mymodel", "python", f"{tmp_path / 'mymodel.py'}:build")
    assert model.class_names == str(tmp_path / "classes.txt")
    assert (config.images.kind, config.images.root) == ("folder", str(tmp_path / "photos"))
    assert not config.dissect.enabled and config.explain.enabled
    assert yaml.safe_load((tmp_path / "audit.yaml").read_text())["models"][0]["callable"] == "mymodel.py:build"
    capsys.readouterr()

    assert main(args) == 2  # never overwrites without --force
    assert capsys.readouterr().err.strip().splitlines() == [
        "xai-audit: audit.yaml exists; pass --force to overwrite it or --out to write another file"
    ]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (["--classes", "missing.txt"], "models.0.class_names"),
        (["--images", "nowhere/"], "images.root"),
        (["--model", "mymodel.py:build", "--out", "configs/audit.yaml"], "--model"),  # the file is not beside it
    ],
)
def test_init_refuses_what_the_config_could_not_find_naming_the_field(tmp_path, monkeypatch, capsys, change, field):
    _own_model_folder(tmp_path)
    (tmp_path / "configs").mkdir()
    monkeypatch.chdir(tmp_path)
    args = {"--model": "mymodel.py:build", "--images": "photos/", "--classes": "classes.txt"}
    args |= dict(zip(change[::2], change[1::2]))
    assert main(["init", *[part for pair in args.items() for part in pair]]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and f": {field}: " in err[0], err  # a single problem is one line
    assert sorted(path.name for path in tmp_path.rglob("*.yaml")) == []
