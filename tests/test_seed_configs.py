"""The seed study's configs: they validate, and run end to end against stand-ins for every download.

The configs are copied verbatim into a temporary ``configs/`` folder beside a ``data/`` folder of
stand-ins, so their relative paths (``../data/...``) resolve exactly as in the repository. Only
the downloads stay untested:

- torchvision weights: random ResNet18/ResNet50 state dicts under the published file names in a
  temporary ``$TORCH_HOME/hub/checkpoints`` (names taken from torchvision's weights metadata);
- Places365: a random 365-class ResNet18 in CSAIL's format (legacy serialisation, ``module.``
  keys, epoch/arch/best_prec1) and a categories file in ``$XAI_AUDIT_CACHE/places365``;
- ``broden1_224``: the synthetic world written in Broden's format;
- ``20k.txt``: a short word list; ``imagenet-samples``: three generated JPEGs;
- CLIP ``ViT-B-16``/``openai``: open_clip's ViT-B-16 with random weights, saved where open_clip's
  download of the tag would have put it in a temporary Hugging Face hub cache
  (``models--timm--vit_base_patch16_clip_224.openai/snapshots/<revision>/``), so the runs load the
  tag from the cache exactly as a machine that fetched it does. Chosen over the toy CLIP because
  it keeps the config's architecture, tokenizer and 224-px preprocessing, so only the weights differ.

The derived configs change sizes only (probe images, LIME samples, metric steps, and the CAM
layer: ScoreCAM and AblationCAM run one forward per channel, 64 at ``layer1.0.conv1`` instead of
2,048 at ``layer4``, which keeps ResNet50 at its real 224-px input within minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import os
import shutil
from collections import OrderedDict
from html.parser import HTMLParser
from pathlib import Path
from urllib.error import URLError

import huggingface_hub
import numpy as np
import pytest
import torch
import torchvision
import yaml
from PIL import Image

from xai_audit.flows.cli import main
from xai_audit.storage.parquet import ResultsStore
from xai_audit.tasks.core.config import WorldConfig
from xai_audit.tasks.data.sources import places365
from xai_audit.tasks.world.synthetic import generate_world

REPO = Path(__file__).resolve().parents[1]
DISSECT = "seed-dissect-resnet18-imagenet-vs-places365.yaml"
DISSECT_20K = "seed-dissect-resnet18-imagenet-vs-places365-20k.yaml"
EXPLAIN = "seed-explain-resnet50.yaml"
SEED_CONFIGS = (DISSECT, DISSECT_20K, EXPLAIN)
# ResNet18's channels per stage (He et al. 2016, Table 1): one neurons row per channel
RESNET18_CHANNELS = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
EXPLAIN_METHODS = ["ablationcam", "gradcam", "lime", "scorecam"]
WORDS = ["red", "blue", "green", "circle", "square", "star", "striped", "dotted", "the", "house", "dog", "sky", "water"]
IMAGES = {
    "n01443537_goldfish.JPEG": (300, 240),
    "n02098286_terrier.JPEG": (256, 320),
    "n04037443_racer.JPEG": (400, 280),
}
N_PROBE = 104  # soft_wpmi averages over the 100 most activating images, so at least 100
LIME_GRID = [
    {"segmentation": "slic", "n_segments": 12, "num_samples": 16},
    {"segmentation": "quickshift", "num_samples": 16},
]


def _published_name(arch: str, weights: str) -> str:
    return os.path.basename(torchvision.models.get_model_weights(arch)[weights].url)


def _write_torchvision_weights(checkpoints: Path) -> None:
    checkpoints.mkdir(parents=True)
    for seed, arch in enumerate(("resnet18", "resnet50")):
        torch.manual_seed(seed)
        torch.save(
            torchvision.models.get_model(arch).state_dict(), checkpoints / _published_name(arch, "IMAGENET1K_V1")
        )


def _write_places365(folder: Path) -> None:
    """CSAIL's resnet18_places365.pth.tar layout and categories_places365.txt (``/a/name index``)."""
    folder.mkdir(parents=True)
    torch.manual_seed(7)
    state = torchvision.models.resnet18(num_classes=365).state_dict()
    checkpoint = {
        "epoch": 90,
        "arch": "resnet18",
        "best_prec1": 54.74,
        "state_dict": OrderedDict((f"module.{key}", value) for key, value in state.items()),
    }
    torch.save(
        checkpoint, folder / "resnet18_places365.pth.tar", _use_new_zipfile_serialization=False, pickle_protocol=2
    )
    (folder / "categories_places365.txt").write_text("".join(f"/s/scene{index} {index}\n" for index in range(365)))


HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def _write_random_clip(hub: Path) -> None:
    """A random ViT-B-16 as the hub cache holds the ``openai`` tag's file (snapshot + ``refs/main``)."""
    import open_clip

    repo = hub / "models--timm--vit_base_patch16_clip_224.openai"
    snapshot = repo / "snapshots" / HUB_REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION)
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16")
    # half precision halves the file; loading copies the values into the fp32 parameters
    torch.save(
        {key: value.half() if value.is_floating_point() else value for key, value in model.state_dict().items()},
        snapshot / "open_clip_pytorch_model.bin",
    )


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (width, height) in IMAGES.items():
        pixels = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((width, height), Image.BILINEAR).save(folder / name, quality=90)


def _derived(config: Path, change) -> Path:
    """A copy of ``config`` beside it with ``change(data)`` applied (same folder: same relative paths)."""
    data = yaml.safe_load(config.read_text())
    change(data)
    out = config.with_name(config.stem + "-standin.yaml")
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def study(prefect_harness, tmp_path_factory):
    """The three seed configs validated and run against stand-ins; their CLI outputs and run ids."""
    root = tmp_path_factory.mktemp("study")
    configs, data = root / "configs", root / "data"
    configs.mkdir()
    for name in SEED_CONFIGS:
        shutil.copy(REPO / "configs" / name, configs / name)
    generate_world(data / "broden1_224", WorldConfig(seed=3, image_size=64, n_train=4, n_val=N_PROBE))
    (data / "20k.txt").write_text("\n".join(WORDS) + "\n")
    _write_images(data / "imagenet-samples")
    _write_torchvision_weights(root / "torch" / "hub" / "checkpoints")
    _write_places365(root / "cache" / "places365")
    _write_random_clip(root / "hub")

    downloads: list[str] = []

    def refuse(url, *args, **kwargs):
        downloads.append(url)
        raise URLError("network disabled in tests")

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(root / "torch"))
        patch.setenv("XAI_AUDIT_CACHE", str(root / "cache"))
        patch.setattr(torch.hub, "download_url_to_file", refuse)
        patch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root / "hub"))
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a lookup beyond the cache raises
        validated = {name: _cli("validate", str(configs / name)) for name in SEED_CONFIGS}

        def small_dissect(data: dict) -> None:
            data["dissect"]["probe"].update(limit=N_PROBE, batch_size=16, workers=0)
            data["dissect"]["clip"].update(batch_size=16)

        def small_explain(data: dict) -> None:
            data["models"][0]["cam_layer"] = "layer1.0.conv1"
            explain = data["explain"]
            explain.update(chunk_size=3, batch_size=3, scorecam_batch_size=32, ablationcam_batch_size=32)
            explain["lime"].update(num_samples=16, batch_size=16)
            explain["lime"]["search"]["grid"] = LIME_GRID
            explain["metrics"].update(steps=4, batch_size=16)

        results = root / "results"
        runs = {
            name: _cli("run", str(_derived(configs / name, change)), "--results", str(results))
            for name, change in ((DISSECT, small_dissect), (DISSECT_20K, small_dissect), (EXPLAIN, small_explain))
        }
    run_ids = {}
    for name, (code, out, err) in runs.items():
        assert code == 0, f"{name} exited {code}:\n{out}\n{err}"
        run_ids[name] = out.splitlines()[0].split()[1].rstrip(":")
    return {
        "root": root,
        "validated": validated,
        "runs": runs,
        "run_ids": run_ids,
        "store": ResultsStore(str(results)),
        "downloads": downloads,
    }


def test_the_seed_configs_name_the_study_setup():
    dissect = yaml.safe_load((REPO / "configs" / DISSECT).read_text())
    twenty_k = yaml.safe_load((REPO / "configs" / DISSECT_20K).read_text())
    explain = yaml.safe_load((REPO / "configs" / EXPLAIN).read_text())
    for config in (dissect, twenty_k):
        assert [(m["source"], m["arch"], m.get("weights")) for m in config["models"]] == [
            ("torchvision", "resnet18", "IMAGENET1K_V1"),
            ("places365", "resnet18", None),
        ]
        assert all(m["layers"] == list(RESNET18_CHANNELS) for m in config["models"])
        clip = config["dissect"]["clip"]
        assert (clip["model"], clip["pretrained"], clip["similarity"]) == ("ViT-B-16", "openai", "soft_wpmi")
        assert config["dissect"]["probe"]["root"] == "../data/broden1_224"
    assert (
        dissect["dissect"]["methods"] == ["clip_dissect", "netdissect"]
        and dissect["dissect"]["concepts"]["source"] == "broden"
    )
    assert twenty_k["dissect"]["concepts"] == {"source": "file", "path": "../data/20k.txt"}
    assert [(m["arch"], m["weights"]) for m in explain["models"]] == [("resnet50", "IMAGENET1K_V1")]
    assert explain["explain"]["methods"] == ["gradcam", "scorecam", "ablationcam", "lime"]
    assert explain["explain"]["lime"]["search"]["enabled"] is True
    assert explain["images"] == {"kind": "folder", "root": "../data/imagenet-samples"}
    # the file names the stand-ins use are the ones torchvision looks for
    assert _published_name("resnet18", "IMAGENET1K_V1") == "resnet18-f37072fd.pth"
    assert _published_name("resnet50", "IMAGENET1K_V1") == "resnet50-0676ba61.pth"


def test_readme_names_every_file_these_configs_download_or_read():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Reproducing the study\n", 1)[1].split("\n## ", 1)[0]
    needed = {places365.URL.format(arch="resnet18"), places365.CATEGORIES_URL}
    for name in SEED_CONFIGS:
        config = yaml.safe_load((REPO / "configs" / name).read_text())
        needed.add(f"configs/{name}")
        needed |= {
            torchvision.models.get_model_weights(m["arch"])[m["weights"]].url
            for m in config["models"]
            if m["source"] == "torchvision"
        }
        for path in (
            config.get("images", {}).get("root"),
            config["dissect"].get("probe", {}).get("root"),
            config["dissect"].get("concepts", {}).get("path"),
        ):
            if path:
                needed.add(path.removeprefix("../"))
    assert {"data/broden1_224", "data/20k.txt", "data/imagenet-samples"} <= needed
    assert sorted(item for item in needed if item not in section) == []


@pytest.mark.slow
def test_the_seed_configs_validate_with_their_data_in_place(study):
    for name, (code, out, err) in study["validated"].items():
        assert code == 0, f"{name}: {err}"
        assert out.startswith(str(study["root"] / "configs" / name) + ": valid")


def test_validate_names_each_missing_download_by_field_and_path(tmp_path):
    for name in SEED_CONFIGS:
        shutil.copy(REPO / "configs" / name, tmp_path / name)
    expected = {
        DISSECT: [("dissect.probe.root", "data/broden1_224")],
        DISSECT_20K: [("dissect.probe.root", "data/broden1_224"), ("dissect.concepts.path", "data/20k.txt")],
        EXPLAIN: [("images.root", "data/imagenet-samples")],
    }
    for name, problems in expected.items():
        code, _, err = _cli("validate", str(tmp_path / name))
        assert code == 2
        for field, path in problems:
            lines = err.splitlines()
            named = [line for line in lines if line.strip().startswith(f"{field}:") or f": {field}: " in line]
            assert any(path in line for line in named), err


@pytest.mark.slow
def test_the_runs_load_every_model_from_the_published_cache_names_without_downloading(study):
    assert study["downloads"] == []
    store, run_ids = study["store"], study["run_ids"]
    runs = store.read("runs")
    assert set(runs.loc[runs["run_id"].isin(run_ids.values()), "status"]) == {"completed"}
    for run_id in run_ids.values():
        assert store.read("errors", run_id).empty


def _label_names(broden: Path) -> set[str]:
    with open(broden / "label.csv", newline="") as handle:
        return {row["name"] for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_dissect_runs_label_every_channel_of_layer1_to_layer4_of_both_models(study):
    store = study["store"]
    labels = _label_names(study["root"] / "data" / "broden1_224")
    expected_methods = {DISSECT: ["clip_dissect", "netdissect"], DISSECT_20K: ["clip_dissect"]}
    for name, methods in expected_methods.items():
        neurons = store.read("neurons", study["run_ids"][name])
        counts = neurons.groupby(["model", "layer", "method"]).size().to_dict()
        assert counts == {
            (model, layer, method): channels
            for model in ("resnet18-imagenet", "resnet18-places365")
            for layer, channels in RESNET18_CHANNELS.items()
            for method in methods
        }
        for (_model, layer, _method), rows in neurons.groupby(["model", "layer", "method"]):
            assert sorted(rows["unit"]) == list(range(RESNET18_CHANNELS[layer]))
        clip = neurons[neurons["method"] == "clip_dissect"]
        # CLIP-Dissect chooses from the configured concept set: Broden's labels or the word file
        vocabulary = {label.replace("_", " ") for label in labels} if name == DISSECT else set(WORDS)
        assert set(clip["concept"]) <= vocabulary
        assert len(set(clip["concept"])) > 1
    netdissect = store.read("neurons", study["run_ids"][DISSECT]).query("method == 'netdissect'")
    assert set(netdissect["concept"].dropna()) <= labels
    assert not netdissect["interpretable"].isna().any()


@pytest.mark.slow
def test_explain_run_has_one_row_per_image_and_method_and_pair(study):
    store, run_id = study["store"], study["run_ids"][EXPLAIN]
    images = sorted(IMAGES)
    predictions = store.read("predictions", run_id)
    assert sorted(predictions["image_id"]) == images and set(predictions["model"]) == {"resnet50-imagenet"}
    assert predictions["label"].between(0, 999).all()
    assert set(predictions["label_name"]) <= set(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    saliency = store.read("saliency", run_id)
    assert sorted(zip(saliency["image_id"], saliency["method"])) == sorted(itertools.product(images, EXPLAIN_METHODS))
    assert set(zip(saliency["height"], saliency["width"])) == {(224, 224)}
    faithfulness = store.read("faithfulness", run_id)
    assert sorted(zip(faithfulness["image_id"], faithfulness["method"])) == sorted(
        itertools.product(images, EXPLAIN_METHODS)
    )
    agreement = store.read("agreement", run_id)
    pairs = sorted((image, *pair) for image in images for pair in itertools.combinations(EXPLAIN_METHODS, 2))
    assert (
        sorted(
            zip(
                agreement["image_id"],
                *[agreement[["method_a", "method_b"]].min(axis=1), agreement[["method_a", "method_b"]].max(axis=1)],
            )
        )
        == pairs
    )
    assert agreement["iou"].between(0, 1).all()
    trials = store.read("lime_trials", run_id)
    assert len(trials) == len(images) * len(LIME_GRID)
    assert trials.groupby("image_id").size().to_dict() == {image: len(LIME_GRID) for image in images}
    assert store.read("localization", run_id).empty  # a plain folder has no masks to localize against


class _Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts (header row first)."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None


def _report(study, name: str) -> tuple[Path, str]:
    """The report path a run printed as its last line, and the page's text."""
    code, out, _ = study["runs"][name]
    last = out.rstrip("\n").splitlines()[-1]
    assert last.startswith("report: ") and last.endswith("/index.html"), out
    path = Path(last.removeprefix("report: "))
    assert path.is_file()
    return path, path.read_text()


@pytest.mark.slow
def test_each_run_ends_by_printing_its_report_which_shows_the_final_status(study):
    for name in SEED_CONFIGS:
        path, page = _report(study, name)
        assert path.parent.name == study["run_ids"][name]
        assert "<dt>status</dt><dd>completed</dd>" in page and "finishing" not in page


@pytest.mark.slow
def test_report_shows_unit_counts_as_integers(study):
    _, page = _report(study, DISSECT)
    parser = _Tables()
    parser.feed(page)
    layers = next(table for table in parser.tables if table and table[0][:4] == ["model", "layer", "method", "units"])
    header, rows = layers[0], layers[1:]
    column = {name: header.index(name) for name in ("method", "units", "counted", "interpretable", "distinct_concepts")}
    assert len(rows) == 2 * 4 * 2
    for row in rows:
        for name in ("units", "counted", "distinct_concepts"):
            assert row[column[name]].isdigit(), (name, row)
        interpretable = row[column["interpretable"]]
        assert interpretable.isdigit() if row[column["method"]] == "netdissect" else interpretable == "–", row
