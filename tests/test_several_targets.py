"""Several targets per image (``explain.target``: ``{topk: K}`` or class names), on constructed ground truth.

The model (``tests/fixtures/two_regions.py``) explains its red class by a red square and its blue
class by a blue square and by nothing else, so the map of each target must lie on its own square;
the tables must carry one row per (image, target, method) and the summaries stay per target.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.fixtures import two_regions
from tests.fixtures.two_regions import BLUE_BOX, CLASS_NAMES, RED_BOX, box_mask
from xai_audit.flows.cli import main
from xai_audit.storage.maps import decode_map
from xai_audit.tasks.core.config import ConfigErrors, parse_config
from xai_audit.tasks.data.models import load_model
from xai_audit.tasks.explain.stage import explain_records
from xai_audit.tasks.results.summary import image_agreement

METHODS = ["gradcam", "scorecam", "ablationcam", "lime"]
RED, BLUE = CLASS_NAMES.index("red"), CLASS_NAMES.index("blue")


def _config(root, target) -> dict:
    return {
        "device": "cpu",
        "models": [
            {
                "name": "two-regions",
                "source": "python",
                "callable": "tests.fixtures.two_regions:two_region_classifier",
                "class_names": CLASS_NAMES,
                "cam_layer": two_regions.LAYER,
                "preprocess": two_regions.PREPROCESS,
            }
        ],
        "images": {"kind": "folder", "root": str(root)},
        "dissect": {"enabled": False},
        "explain": {
            "methods": METHODS,
            "target": target,
            # hidden superpixels turn background grey (lime's default, their mean colour, leaves a square as it is)
            "lime": {
                "num_samples": 150,
                "segmentation": "slic",
                "segmentation_params": {"n_segments": 30},
                "hide_color": [128, 128, 128],
            },
            "metrics": {"steps": 8},
        },
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("two-squares")
    records = []
    for seed in range(2):
        path = root / f"squares-{seed}.png"
        Image.fromarray(two_regions.two_squares(seed)).save(path)
        records.append({"image_id": path.name, "path": str(path)})
    return root, records


def _explained(images, target):
    root, records = images
    config = parse_config(_config(root, target))
    model = load_model(config.models[0])
    return explain_records(config, config.models[0], model, records).tables


@pytest.fixture(scope="module")
def top2(images):
    return _explained(images, {"topk": 2})


def _energy(saliency_row, box) -> float:
    heat = np.clip(decode_map(saliency_row).astype(np.float64), 0, None)  # LIME's maps are signed
    return float(heat[box_mask(box)].sum() / heat.sum())


def test_each_targets_map_lies_on_its_own_region(top2):
    rows = top2["saliency"]
    assert {row["target"] for row in rows} == {RED, BLUE}
    for row in rows:
        own, other = (RED_BOX, BLUE_BOX) if row["target"] == RED else (BLUE_BOX, RED_BOX)
        on_own, on_other = _energy(row, own), _energy(row, other)
        assert on_own > 0.5 and on_own > 5 * on_other, (row["method"], row["target"], on_own, on_other)


def test_topk_gives_one_row_per_image_target_and_method_in_every_table(top2):
    assert not top2["errors"], top2["errors"]
    assert len(top2["predictions"]) == 2  # one per image, whatever the targets
    for table, key in (
        ("saliency", ("image_id", "target", "method")),
        ("faithfulness", ("image_id", "target", "method")),
        ("agreement", ("image_id", "target", "method_a", "method_b")),
    ):
        keys = [tuple(row[column] for column in key) for row in top2[table]]
        assert len(keys) == len(set(keys)), table
        targets_of: dict[tuple, set[int]] = {}
        for row in top2[table]:
            rest = tuple(row[column] for column in key if column != "target")
            targets_of.setdefault(rest, set()).add(row["target"])
        assert all(targets == {RED, BLUE} for targets in targets_of.values()), table
    pairs = len(METHODS) * (len(METHODS) - 1) // 2
    assert len(top2["agreement"]) == 2 * 2 * pairs


def test_summary_images_rank_each_image_and_target(top2):
    import pandas as pd

    predictions = pd.DataFrame(top2["predictions"])
    summary = image_agreement(pd.DataFrame(top2["agreement"]), pd.DataFrame(top2["saliency"]), predictions)
    assert len(summary) == 4
    assert set(zip(summary["image_id"], summary["target"], summary["class_name"])) == {
        (image_id, target, CLASS_NAMES[target]) for image_id in predictions["image_id"] for target in (RED, BLUE)
    }
    assert sorted(summary["rank"]) == [1, 2, 3, 4]


def test_a_class_name_list_explains_those_classes_in_its_order(images):
    tables = _explained(images, ["blue", "red"])
    gradcam = [row for row in tables["saliency"] if row["method"] == "gradcam"]
    assert [row["target"] for row in gradcam if row["image_id"] == "squares-0.png"] == [BLUE, RED]
    for row in gradcam:
        own = BLUE_BOX if row["target"] == BLUE else RED_BOX
        assert _energy(row, own) > 0.5


def test_the_default_target_is_the_top1_class_one_row_per_image_and_method(images):
    tables = _explained(images, "predicted")
    assert sorted((row["image_id"], row["method"]) for row in tables["saliency"]) == sorted(
        (record["image_id"], method) for record in images[1] for method in METHODS
    )
    assert {row["target"] for row in tables["saliency"]} == {RED}
    assert {row["target"] for row in tables["faithfulness"]} == {RED}


def test_an_unknown_class_name_is_a_config_error_naming_the_field_before_any_work(images, tmp_path, capsys):
    import yaml

    from xai_audit.flows.preflight import check

    config = parse_config(_config(images[0], ["blue", "purple"]))
    with pytest.raises(ConfigErrors) as caught:
        check(config)
    problems = dict(caught.value.problems)
    assert "explain.target.1" in problems and "purple" in problems["explain.target.1"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(images[0], ["blue", "purple"])))
    assert main(["validate", str(path)]) == 2
    assert "explain.target.1" in capsys.readouterr().err


@pytest.mark.parametrize("target", [{"topk": 0}, {"topk": 2, "extra": 1}, [], ["red", "red"], "top1"])
def test_a_malformed_target_is_one_error_on_the_field(target):
    with pytest.raises(ConfigErrors) as caught:
        parse_config({"explain": {"target": target}})
    assert [field for field, _ in caught.value.problems] == ["explain.target"]


def test_the_report_page_of_an_image_shows_the_maps_of_each_target(top2, images, tmp_path):
    import re
    from pathlib import Path

    from xai_audit.storage.parquet import ResultsStore
    from xai_audit.storage.runs import RunRecord
    from xai_audit.tasks.results.report import write_report
    from xai_audit.tasks.results.summary import summarize_run

    store = ResultsStore(tmp_path / "results")
    config = parse_config(_config(images[0], {"topk": 2}))
    RunRecord(run_id="r", config_name="c", config_json=config.canonical_json(), config_hash="h", device="cpu").save(
        store
    )
    for table, rows in top2.items():
        store.write(table, "r", "chunk", rows)
    summarize_run(store, "r")
    index = Path(write_report(store, "r"))
    page = next((index.parent / "images").glob("*.html")).read_text()
    figures = re.findall(r'<img class="fig" src="\.\./([^"]+)"', page)
    assert len(figures) == 2 and all((index.parent / figure).is_file() for figure in figures)
    digest = index.read_text()
    assert re.search(r"image the methods agree on most: squares-\d\.png for (red|blue)", digest)
