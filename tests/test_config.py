"""Config validation: every problem is reported with its field path; the reference cannot drift."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from xai_audit.flows.cli import main
from xai_audit.flows.docs import GENERATED_BLOCKS, block_text, iter_options
from xai_audit.tasks.core.config import AuditConfig, ConfigErrors, load_config, parse_config

REPO = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def problems_of(data: object, base: Path | None = None) -> dict[str, str]:
    with pytest.raises(ConfigErrors) as caught:
        parse_config(data, base)
    return dict(caught.value.problems)


def test_empty_config_is_the_demo_default():
    config = parse_config({})
    assert config.models[0].source == "demo"
    assert config.images.kind == "world"


def test_a_model_is_found_by_its_name_and_an_unknown_name_is_a_key_error():
    config = parse_config({"models": [{"name": "first", "source": "demo"}, {"name": "second", "source": "demo"}]})
    assert config.model("second") is config.models[1]
    assert config.model("first") is config.models[0]
    with pytest.raises(KeyError, match="third"):
        config.model("third")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"bogus": 1}, "bogus"),
        ({"explain": {"chunk_sise": 4}}, "explain.chunk_sise"),
        ({"seed": "many"}, "seed"),
        ({"explain": {"batch_size": -3}}, "explain.batch_size"),
        ({"explain": {"chunk_size": 0}}, "explain.chunk_size"),
        ({"models": []}, "models"),
        ({"explain": {"methods": ["gradcam", "gradcam"]}}, "explain.methods"),
        ({"device": "gpu0"}, "device"),
        ({"explain": {"lime": {"batch_size": "big"}}}, "explain.lime.batch_size"),
        ({"explain": {"lime": {"batch_size": 0}}}, "explain.lime.batch_size"),
        ({"explain": {"scorecam_batch_size": "max"}}, "explain.scorecam_batch_size"),
        ({"explain": {"metrics": {"batch_size": -1}}}, "explain.metrics.batch_size"),
    ],
)
def test_invalid_option_is_reported_with_its_field_path(data, field):
    assert field in problems_of(data)


@pytest.mark.parametrize(
    ("data", "field", "valid_name"),
    [
        ({"explain": {"methods": ["gradcam", "telepathy"]}}, "explain.methods", "scorecam"),
        ({"dissect": {"methods": ["clip_dissect", "phrenology"]}}, "dissect.methods", "netdissect"),
        ({"dissect": {"clip": {"similarity": "cosine"}}}, "dissect.clip.similarity", "soft_wpmi"),
    ],
)
def test_unknown_registry_names_are_reported_before_any_work(data, field, valid_name):
    from xai_audit.flows.preflight import registry_problems

    problems = dict(registry_problems(parse_config(data)))
    assert set(problems) == {field} and valid_name in problems[field]


def test_missing_file_is_reported_relative_to_the_config_folder(tmp_path):
    path = write_config(
        tmp_path, {"models": [{"name": "m", "source": "checkpoint", "arch": "resnet18", "path": "weights/missing.pt"}]}
    )
    with pytest.raises(ConfigErrors) as caught:
        load_config(path)
    ((field, message),) = caught.value.problems
    assert field == "models.0.path"
    assert str(tmp_path / "weights" / "missing.pt") in message


def test_every_problem_is_reported_at_once():
    problems = problems_of({"seed": "x", "explain": {"batch_size": 0}, "extra": True})
    assert {"seed", "explain.batch_size", "extra"} <= set(problems)


def test_relative_paths_become_absolute_against_the_config_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    config = load_config(write_config(tmp_path, {"images": {"kind": "folder", "root": "imgs"}}))
    assert config.images.root == str(tmp_path / "imgs")


def test_yaml_is_safe_loaded(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigErrors):
        load_config(path)
    assert not (Path.cwd() / "pwned").exists()


def test_config_hash_ignores_key_order():
    one = parse_config({"seed": 1, "name": "a"})
    two = parse_config({"name": "a", "seed": 1})
    assert one.config_hash() == two.config_hash()
    assert one.config_hash() != parse_config({"name": "a", "seed": 2}).config_hash()


def test_config_hash_ignores_how_tasks_run_so_a_run_resumes_on_another_runner():
    threads = parse_config({"name": "a", "runner": {"kind": "thread", "workers": 4}})
    dask = parse_config({"name": "a", "runner": {"kind": "dask", "n_workers": 3}})
    assert threads.config_hash() == dask.config_hash()
    assert threads.config_hash() != parse_config({"name": "a", "explain": {"chunk_size": 3}}).config_hash()


def test_every_option_has_a_description():
    undocumented = [path for path, _, _, text in iter_options() if not text.strip()]
    assert undocumented == []


@pytest.mark.parametrize("block", sorted(GENERATED_BLOCKS))
def test_readme_reference_blocks_match_the_code(block):
    current = block_text((REPO / "README.md").read_text(), block)
    assert current is not None, f"README lacks the generated {block} block"
    assert current == GENERATED_BLOCKS[block]().strip(), f"README {block} is stale: run `make docs`"


def test_validate_cli_exits_2_naming_each_field(tmp_path, capsys):
    path = write_config(tmp_path, {"explain": {"batch_size": -1}, "unknown_key": 3})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "explain.batch_size" in err and "unknown_key" in err


def test_validate_cli_accepts_the_demo_config(capsys):
    assert main(["validate", str(REPO / "configs" / "demo.yaml")]) == 0
    assert "valid" in capsys.readouterr().out


def test_defaults_validate_themselves():
    assert AuditConfig().model_dump() == parse_config({}).model_dump()


@pytest.mark.parametrize(
    ("model", "field", "hint"),
    [
        ({"source": "torchvision", "arch": "resnet81", "weights": "IMAGENET1K_V1"}, "models.0.arch", "resnet18"),
        ({"source": "torchvision", "arch": "resnet18", "weights": "IMAGENET9K"}, "models.0.weights", "IMAGENET1K_V1"),
        ({"source": "demo", "cam_layer": "layer5"}, "models.0.cam_layer", "layer4"),
        ({"source": "places365", "arch": "resnet18", "layers": ["layer1", "layer4.9"]}, "models.0.layers", "layer4.1"),
    ],
)
def test_preflight_names_unknown_models_weights_and_layers(model, field, hint):
    from xai_audit.flows.preflight import check

    with pytest.raises(ConfigErrors) as caught:
        check(parse_config({"models": [{"name": "m", **model}]}))
    problems = dict(caught.value.problems)
    assert field in problems and hint in problems[field]


def test_preflight_rejects_empty_image_and_concept_sets(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "concepts.txt").write_text("\n  \n\n")
    path = write_config(
        tmp_path,
        {
            "images": {"kind": "folder", "root": "empty"},
            "dissect": {"concepts": {"source": "file", "path": "concepts.txt"}},
        },
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "images: the image set is empty" in err and "dissect.concepts.path" in err


def test_preflight_accepts_a_valid_real_model_config():
    from xai_audit.flows.preflight import check

    check(
        parse_config(
            {
                "models": [
                    {
                        "name": "r50",
                        "source": "torchvision",
                        "arch": "resnet50",
                        "weights": "IMAGENET1K_V2",
                        "layers": ["layer3", "layer4.2.conv3"],
                    }
                ],
                "dissect": {"allow_synthetic": True},  # labelled on the world, on purpose
            }
        )
    )


@pytest.mark.parametrize(
    ("similarity", "limit", "rejected"),
    [
        ("soft_wpmi", 99, True),
        ("soft_wpmi", 100, False),
        ("wpmi", 27, True),
        ("wpmi", 28, False),
        ("cos_similarity", 5, False),
    ],
)
def test_preflight_rejects_a_probe_limit_below_the_similarity_functions_top_k(similarity, limit, rejected):
    """soft_wpmi ranks each unit's 100 top images and wpmi its 28 (the paper's values).

    Fewer fail at once, not mid-run.
    """
    from xai_audit.flows.preflight import check

    config = parse_config(
        {"dissect": {"methods": ["clip_dissect"], "probe": {"limit": limit}, "clip": {"similarity": similarity}}}
    )
    if rejected:
        with pytest.raises(ConfigErrors) as caught:
            check(config)
        assert str(limit) in dict(caught.value.problems)["dissect.probe.limit"]
    else:
        check(config)


@pytest.mark.parametrize(("layers", "rejected"), [(["layer3"], False), (["layer3", "fc"], True), (None, False)])
def test_preflight_rejects_concept_layers_no_model_dissects(layers, rejected):
    """A concept-attribution layer outside every model's models.layers would get no rows: exit 2 first."""
    from xai_audit.flows.preflight import check

    demo = {"name": "demo-resnet18", "source": "demo", "layers": ["layer3", "layer4"]}
    config = parse_config({"models": [demo], "explain": {"concepts": {"layers": layers}}})
    if rejected:
        with pytest.raises(ConfigErrors) as caught:
            check(config)
        assert "'fc'" in dict(caught.value.problems)["explain.concepts.layers"]
    else:
        check(config)


def test_a_list_image_set_takes_its_root_from_the_list_files_folder(tmp_path):
    """The docs say images.root defaults to the list file's folder for the list kind."""
    listing = tmp_path / "sets" / "images.csv"
    listing.parent.mkdir()
    listing.write_text("a.png\n")
    config = parse_config(
        {"models": [{"name": "m", "source": "demo"}], "images": {"kind": "list", "list_file": str(listing)}}
    )
    assert config.images.root == str(listing.parent)
    explicit = parse_config(
        {
            "models": [{"name": "m", "source": "demo"}],
            "images": {"kind": "list", "list_file": str(listing), "root": str(tmp_path)},
        }
    )
    assert explicit.images.root == str(tmp_path)
    with pytest.raises(ConfigErrors, match="needs root"):
        parse_config({"models": [{"name": "m", "source": "demo"}], "images": {"kind": "folder"}})


def test_validate_cli_rejects_a_malformed_demo_recipe_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("XAI_AUDIT_DEMO_RECIPE", "bf16=sometimes")
    assert main(["validate", str(REPO / "configs" / "demo.yaml")]) == 2
    err = capsys.readouterr().err
    assert "XAI_AUDIT_DEMO_RECIPE: bf16='sometimes' is not on or off" in err and "Traceback" not in err
