"""Every family users audit (#22): torchvision ViT, Swin, MaxViT, ConvNeXt, EfficientNet, MobileNetV3,
RegNet; timm ViT, DeiT with CLS and distillation tokens, Swin, ConvNeXt, EfficientNet.

Random weights at test size (``tests/fixtures/zoo_models.py``). The CAM layer chosen per family is
checked against grad-cam's documentation (``tutorials/vision_transformers.md`` in
jacobgil/pytorch-grad-cam: ``model.blocks[-1].norm1`` for ViTs, the last block's ``norm1`` for Swin;
the last convolutional stage for CNNs), and for ViTs the pipeline's maps against grad-cam's classes
called as that tutorial and ``usage_examples/vit_example.py`` call them: the documented
``reshape_transform`` (drop the CLS token, fold 14×14 patches, channels first) and, for AblationCAM,
``ablation_layer=AblationLayerVit()``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_grad_cam import (
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)
from pytorch_grad_cam.ablation_layer import AblationLayerVit
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from tests.fixtures.zoo_models import ZOO
from xai_audit.storage.maps import decode_map
from xai_audit.tasks.core.config import parse_config
from xai_audit.tasks.data.image_sets import iter_image_set, record_row
from xai_audit.tasks.data.layer_layout import layer_layout
from xai_audit.tasks.data.models import default_cam_layer, load_model
from xai_audit.tasks.dissect.labellers import labeller
from xai_audit.tasks.dissect.probe import open_probe
from xai_audit.tasks.dissect.stage import model_layers
from xai_audit.tasks.explain.stage import explain_records

CAMS = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "eigencam", "scorecam", "ablationcam"]
STOCK = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "xgradcam": XGradCAM,
    "layercam": LayerCAM,
    "hirescam": HiResCAM,
    "eigencam": EigenCAM,
    "scorecam": ScoreCAM,
    "ablationcam": AblationCAM,
}
# Transformers (token and channels-last layers, where the reshape transform matters) run every CAM and
# LIME end to end; CNNs run Grad-CAM, AblationCAM and LIME (test_cams.py covers every CAM on CNNs, and
# ScoreCAM's cost grows with the 440-1,280 units of these heads).
N_IMAGES = 2


def _config(family: str):
    member = ZOO[family]
    return parse_config(
        {
            "device": "cpu",
            "models": [
                {
                    "name": family,
                    "source": "python",
                    "callable": f"tests.fixtures.zoo_models:{member.factory}",
                    "num_classes": 3,
                    "preprocess": {"resize": member.size, "crop": member.size},
                }
            ],
            "images": {"kind": "world", "split": "val", "limit": N_IMAGES},
            "dissect": {
                "methods": ["clip_dissect", "netdissect"],
                "probe": {"limit": 8, "batch_size": 8},
                "clip": {"similarity": "cos_similarity_cubed"},  # soft_wpmi needs 100 probe images
                "top_images": 3,
            },
            "explain": {
                "methods": CAMS + ["lime"],
                "batch_size": N_IMAGES,
                "precision": "fp32",  # compared with grad-cam's classes, which run in fp32
                "lime": {"num_samples": 24, "batch_size": 24},
                "metrics": {"steps": 2, "batch_size": 8, "road": False, "localization": False},
            },
        }
    )


_loaded: dict[str, object] = {}


def _model(family: str):
    if family not in _loaded:
        config = _config(family)
        _loaded[family] = (config, load_model(config.models[0]))
    return _loaded[family]


@pytest.mark.parametrize("family", list(ZOO))
def test_the_default_cam_layer_and_its_layout_are_the_ones_grad_cams_documentation_names(family):
    _, model = _model(family)
    member = ZOO[family]
    name = default_cam_layer(model.module, model.input_size)
    assert name == member.cam_layer
    assert layer_layout(model.module, model.module.get_submodule(name), model.input_size).kind == member.layout


def _documented_vit_transform(height: int, width: int):
    """grad-cam's ``tutorials/vision_transformers.md`` reshape_transform, with the grid of this ViT."""

    def reshape_transform(tensor):
        result = tensor[:, 1:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)

    return reshape_transform


@pytest.mark.parametrize("family", ["tv-vit", "timm-vit"])
def test_vit_maps_equal_grad_cams_classes_with_its_documented_vit_reshape_transform(family):
    config, model = _model(family)
    records = [record_row(r) for r in iter_image_set(config)]
    config = config.model_copy(update={"explain": config.explain.model_copy(update={"methods": CAMS})})
    rows = explain_records(config, config.models[0], model, records)
    assert not rows.tables["errors"], rows.tables["errors"]
    assert {row["cam_layout"] for row in rows.tables["predictions"]} == {
        "tokens: 1 prefix token(s) dropped, patch tokens as a square grid"
    }
    saliency = {(row["image_id"], row["method"]): row for row in rows.tables["saliency"]}
    module = model.module
    layer = module.get_submodule(ZOO[family].cam_layer)
    grid = model.input_size // 8
    images = torch.stack([model.preprocess(Image.open(r["path"]).convert("RGB")) for r in records])
    targets = [saliency[(r["image_id"], "gradcam")]["target"] for r in records]
    for method in CAMS:
        options = {"ablation_layer": AblationLayerVit()} if method == "ablationcam" else {}
        with STOCK[method](
            module, [layer], reshape_transform=_documented_vit_transform(grid, grid), **options
        ) as stock:
            expected = stock(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets])
        ours = np.stack([decode_map(saliency[(r["image_id"], method)]) for r in records])
        np.testing.assert_allclose(ours, expected, atol=2e-3, err_msg=method)  # stored as float16


@pytest.mark.slow
@pytest.mark.parametrize("family", list(ZOO))
def test_explain_and_dissect_stages_run_end_to_end_on_every_family(family):
    config, model = _model(family)
    layer_name = default_cam_layer(model.module, model.input_size)
    layout = layer_layout(model.module, model.module.get_submodule(layer_name), model.input_size)
    units = _units(model, layer_name, layout)
    methods = CAMS if layout.channels_last else ["gradcam", "ablationcam"]
    explain = config.explain.model_copy(update={"methods": [*methods, "lime"]})
    config = config.model_copy(update={"explain": explain})
    records = [record_row(r) for r in iter_image_set(config)]

    rows = explain_records(config, config.models[0], model, records).tables

    assert not rows["errors"], rows["errors"]
    assert {(row["cam_layer"], row["cam_layout"].split(":")[0]) for row in rows["predictions"]} == {
        (layer_name, layout.kind)
    }
    assert len(rows["saliency"]) == N_IMAGES * len(explain.methods)
    for row in rows["saliency"]:
        saliency_map = decode_map(row)
        assert saliency_map.shape == (model.input_size, model.input_size), row["method"]
        low = -1 if row["method"] == "lime" else 0  # LIME's map keeps the sign of each superpixel's weight
        assert np.isfinite(saliency_map).all(), row["method"]
        assert low <= saliency_map.min() and saliency_map.max() <= 1, row["method"]
    assert {row["method"] for row in rows["faithfulness"]} == set(explain.methods)

    probe = open_probe(config)
    layers = model_layers(model, None)
    assert layers == [layer_name]
    for method in config.dissect.methods:
        labels = labeller(method).label(config, model, layers, layers, probe)
        assert not labels.errors, labels.errors
        frame = labels.frames[layer_name]
        assert sorted(frame["unit"]) == list(range(units)), method  # every unit of the layer, labelled once
        assert frame["concept"].notna().all()


def _units(model, layer_name, layout) -> int:
    captured = []
    handle = model.module.get_submodule(layer_name).register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        model.module(torch.zeros(1, 3, model.input_size, model.input_size))
    handle.remove()
    return layout(captured[0]).shape[1]
