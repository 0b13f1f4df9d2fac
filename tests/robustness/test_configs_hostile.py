"""The config cases of the bad-input matrix: exit 2 before any work, naming the field and the valid names."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.robustness.audit_files import tiny_audit, write_config, write_images
from xai_audit.flows.cli import main
from xai_audit.tasks.core.config import ConfigErrors, load_config, parse_config

CLIP_DISSECT = {"enabled": True, "methods": ["clip_dissect"]}


def _model(**fields) -> dict:
    return {"models": [{"name": "m", **fields}]}


# (case, overrides of the tiny audit, field path in the message, a valid name the message must list or None)
CASES = [
    ("unknown key", {"explain": {"chunk_sise": 4}}, "explain.chunk_sise", None),
    ("unknown top-level key", {"bogus": 1}, "bogus", None),
    ("wrong type", {"seed": "many"}, "seed", None),
    ("wrong type in a list", {"explain": {"methods": "gradcam"}}, "explain.methods", None),
    (
        "missing file",
        {"images": {"kind": "list", "root": "images", "list_file": "nowhere.csv"}},
        "images.list_file",
        None,
    ),
    ("missing folder", {"images": {"kind": "folder", "root": "no-such-folder"}}, "images.root", None),
    ("unknown model source", _model(source="tensorflow-hub"), "models.0.source", "torchvision"),
    (
        "unknown model architecture",
        _model(source="torchvision", arch="resnet81", weights="IMAGENET1K_V1"),
        "models.0.arch",
        "resnet18",
    ),
    (
        "unknown weights",
        _model(source="torchvision", arch="resnet18", weights="IMAGENET9K"),
        "models.0.weights",
        "IMAGENET1K_V1",
    ),
    ("unknown CAM layer", _model(source="demo", cam_layer="layer5"), "models.0.cam_layer", "layer4"),
    (
        "unknown dissect layer",
        _model(source="torchvision", arch="resnet18", weights="DEFAULT", layers=["layer4.7"]),
        "models.0.layers",
        "layer4.1",
    ),
    ("unknown CAM method", {"explain": {"methods": ["gradcam", "telepathycam"]}}, "explain.methods", "scorecam"),
    (
        "unknown similarity function",
        {"dissect": {**CLIP_DISSECT, "clip": {"similarity": "cosine"}}},
        "dissect.clip.similarity",
        "soft_wpmi",
    ),
    (
        "unknown segmentation algorithm",
        {"explain": {"methods": ["lime"], "lime": {"segmentation": "watershed"}}},
        "explain.lime.segmentation",
        "quickshift",
    ),
    (
        "unknown segmentation algorithm in the search grid",
        {
            "explain": {
                "methods": ["lime"],
                "lime": {
                    "search": {"enabled": True, "grid": [{"segmentation": "slic"}, {"segmentation": "watershed"}]}
                },
            }
        },
        "explain.lime.search.grid.1.segmentation",
        "felzenszwalb",
    ),
    (
        "unknown segmentation parameter",
        {"explain": {"methods": ["lime"], "lime": {"segmentation": "slic", "segmentation_params": {"n_segmets": 9}}}},
        "explain.lime.segmentation_params.n_segmets",
        "n_segments",
    ),
    ("negative size", {"explain": {"batch_size": -1}}, "explain.batch_size", None),
    ("zero size", {"explain": {"chunk_size": 0}}, "explain.chunk_size", None),
    (
        "zero crop",
        _model(
            source="python", callable="tests.fixtures.tiny_models:tiny_resnet", num_classes=3, preprocess={"crop": 0}
        ),
        "models.0.preprocess.crop",
        None,
    ),
    ("zero image size", {"world": {"image_size": 0}}, "world.image_size", None),
    ("negative sample count", {"explain": {"lime": {"num_samples": -5}}}, "explain.lime.num_samples", None),
    ("quantile of one or more", {"dissect": {"netdissect": {"quantile": 1.5}}}, "dissect.netdissect.quantile", None),
    ("quantile of zero", {"dissect": {"netdissect": {"quantile": 0}}}, "dissect.netdissect.quantile", None),
    ("share outside (0, 1)", {"explain": {"metrics": {"agreement_q": 1.0}}}, "explain.metrics.agreement_q", None),
    ("empty image folder", {"images": {"kind": "folder", "root": "empty"}}, "images", None),
    ("empty image list", {"images": {"kind": "list", "root": "images", "list_file": "empty.txt"}}, "images", None),
    (
        "empty concept set",
        {"dissect": {**CLIP_DISSECT, "concepts": {"source": "file", "path": "blank-concepts.txt"}}},
        "dissect.concepts.path",
        None,
    ),
]


@pytest.fixture
def workspace(tmp_path) -> Path:
    write_images(tmp_path / "images")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    (tmp_path / "blank-concepts.txt").write_text("\n   \n\t\n")
    return tmp_path


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize(("case", "overrides", "field", "valid_name"), CASES, ids=[case[0] for case in CASES])
def test_bad_config_exits_2_before_any_work_naming_the_field(
    workspace, capsys, command, case, overrides, field, valid_name
):
    config = write_config(workspace, _merge(tiny_audit("images"), overrides))
    results = workspace / "results"
    arguments = [command, str(config)] + (["--results", str(results)] if command == "run" else [])
    assert main(arguments) == 2
    lines = capsys.readouterr().err.splitlines()
    # one problem is one line ("invalid config PATH: FIELD: ..."), several are indented lines under a header
    named = [line for line in lines if line.strip().startswith(f"{field}:") or f": {field}: " in line]
    assert named, f"no line names {field!r}: {lines}"
    if valid_name is not None:
        assert any(valid_name in line for line in named), named
    assert not results.exists()  # nothing was started, not even the run manifest


def test_the_tiny_audit_itself_is_valid(workspace, capsys):
    """The base every case above breaks one thing of: without the break it passes."""
    assert main(["validate", str(write_config(workspace, tiny_audit("images")))]) == 0


def test_missing_or_unreadable_config_file_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert "(file)" in capsys.readouterr().err
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    assert main(["run", str(tmp_path / "latin1.yaml"), "--results", str(tmp_path / "results")]) == 2
    assert "(file)" in capsys.readouterr().err and not (tmp_path / "results").exists()


# --------------------------------------------------------------------------- fuzz

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=12)
)
_KEYS = st.sampled_from(
    [
        "name",
        "seed",
        "models",
        "images",
        "explain",
        "dissect",
        "world",
        "runner",
        "device",
        "results",
        "kind",
        "root",
        "methods",
        "batch_size",
        "chunk_size",
        "source",
        "arch",
        "layers",
        "quantile",
        "lime",
        "search",
        "grid",
        "metrics",
        "0",
        "bogus",
    ]
) | st.text(max_size=8)
_TREES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _TREES, max_size=6) | _TREES)
def test_any_nested_data_parses_or_raises_config_errors(data):
    try:
        config = parse_config(data, base=Path(tempfile.gettempdir()))
    except ConfigErrors as error:
        assert error.problems and all(isinstance(field, str) and message for field, message in error.problems)
        return
    assert config.config_hash()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(max_size=300),
        st.binary(max_size=300).map(lambda raw: raw.decode("latin-1")),
        _TREES.map(lambda tree: yaml.safe_dump(tree, allow_unicode=True)),
    )
)
def test_any_yaml_text_loads_or_raises_config_errors(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(path)
        except ConfigErrors as error:
            assert error.problems
