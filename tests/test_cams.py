"""CAMs from one shared pass equal what grad-cam's own classes return, called the standard way."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as library
import torch
import torchvision
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from xai_audit.tasks.compute.inference import inference_model
from xai_audit.tasks.core.errors import ConfigError
from xai_audit.tasks.explain.cams import CAM_METHODS, compute_cams, forward_with_cams

LIBRARY_CLASSES = {
    "gradcam": library.GradCAM,
    "gradcam++": library.GradCAMPlusPlus,
    "xgradcam": library.XGradCAM,
    "layercam": library.LayerCAM,
    "hirescam": library.HiResCAM,
    "eigencam": library.EigenCAM,
    "scorecam": library.ScoreCAM,
    "ablationcam": library.AblationCAM,
}
GRADIENT_METHODS = ["gradcam", "gradcam++", "hirescam", "layercam", "xgradcam"]
TARGETS = [3, 6]  # classes whose maps are not constant for this random model and input


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def shared(model, images):
    return forward_with_cams(model, model.layer3[-1], images, TARGETS, list(LIBRARY_CLASSES))


def test_registry_covers_the_config_names():
    # Group-CAM is ours (no library ships it): tests/test_groupcam.py checks it against the paper's equations
    assert set(CAM_METHODS) - {"groupcam"} == set(LIBRARY_CLASSES)
    for name, cls in CAM_METHODS.items():
        if name == "groupcam":
            continue
        assert issubclass(cls, LIBRARY_CLASSES[name])


@pytest.mark.parametrize("method", list(LIBRARY_CLASSES))
def test_each_cam_equals_grad_cam_called_the_standard_way(model, images, shared, method):
    with LIBRARY_CLASSES[method](model=model, target_layers=[model.layer3[-1]]) as cam:
        expected = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in TARGETS])
    ours = shared[1][method]
    assert ours.shape == (2, 64, 64) and ours.dtype == np.float32
    assert all(one.std() > 0.05 for one in expected), "a constant map would make the comparison vacuous"
    assert np.abs(ours - expected).max() <= 1e-5
    assert ours.min() >= 0.0 and ours.max() <= 1.0


def test_shared_forward_logits_equal_the_model_output(model, images, shared):
    with torch.no_grad():
        expected = model(images)
    assert torch.equal(shared[0], expected)


def test_one_forward_serves_every_gradient_cam_and_backward_stops_at_the_layer(model, images):
    calls = []
    handle = model.register_forward_hook(lambda module, inputs, output: calls.append(output.shape[0]))
    model.zero_grad(set_to_none=True)
    try:
        forward_with_cams(model, model.layer3[-1], images, TARGETS, GRADIENT_METHODS + ["eigencam"])
    finally:
        handle.remove()
    assert calls == [2]
    assert all(parameter.grad is None for parameter in model.parameters())


def test_a_batch_equals_its_images_one_at_a_time(model, images, shared):
    methods = GRADIENT_METHODS + ["eigencam", "ablationcam"]
    for index in range(len(images)):
        logits, alone = forward_with_cams(
            model, model.layer3[-1], images[index : index + 1], TARGETS[index : index + 1], methods
        )
        assert torch.allclose(logits[0], shared[0][index], atol=1e-5)
        for method in methods:
            # AblationCAM divides by (original - ablated score), which magnifies the batch
            # size's float noise in the original score; the library shares that.
            tolerance = 1e-4 if method == "ablationcam" else 1e-5
            assert np.abs(alone[method][0] - shared[1][method][index]).max() <= tolerance, method


def test_no_targets_means_each_images_top_prediction(model, images, shared):
    top = shared[0].argmax(dim=-1).tolist()
    explicit = compute_cams(model, model.layer3[-1], images, top, ["gradcam", "layercam"])
    implicit = compute_cams(model, model.layer3[-1], images, None, ["gradcam", "layercam"])
    for method in explicit:
        assert np.array_equal(explicit[method], implicit[method])


def test_bf16_autocast_keeps_the_gradcam_map(model, images, shared):
    logits, maps = forward_with_cams(model, model.layer3[-1], images, TARGETS, ["gradcam"], amp_dtype=torch.bfloat16)
    assert logits.dtype == torch.float32
    for ours, full in zip(maps["gradcam"], shared[1]["gradcam"]):
        assert np.corrcoef(ours.ravel(), full.ravel())[0, 1] >= 0.99


def test_unknown_method_is_a_config_error_listing_the_valid_names(model, images):
    with pytest.raises(ConfigError, match="gradcam\\+\\+.*scorecam"):
        compute_cams(model, model.layer3[-1], images, TARGETS, ["gradcam", "fullgradcam"])


class DuplicateChannels(nn.Module):
    """A conv whose channels 4-5 copy channel 0 and 6-7 are dead: three masks ScoreCAM can reuse."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4))
        with torch.no_grad():
            self.conv.weight[4:6] = self.conv.weight[0]
            self.conv.bias[4:6] = self.conv.bias[0]
            self.conv.bias[6:8] = -1e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(x)))


def test_scorecam_scores_each_distinct_mask_once_and_still_equals_the_library():
    model = DuplicateChannels().eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    shared_rows, masked_rows = [], []
    # the masked forwards run through the model's (cached) inference copy, built and checked against the
    # model on one image before the counting hooks
    inference_model(model, images).conv.register_forward_hook(
        lambda module, inputs, output: masked_rows.append(output.shape[0])
    )
    handle = model.conv.register_forward_hook(lambda module, inputs, output: shared_rows.append(output.shape[0]))
    try:
        ours = compute_cams(model, model.relu, images, [1, 2], ["scorecam"], scorecam_batch_size=4)["scorecam"]
    finally:
        handle.remove()
    assert sum(shared_rows) == 2  # the shared forward
    assert sum(masked_rows) == 2 * 5  # 5 distinct masks of 8 per image
    with library.ScoreCAM(model=model, target_layers=[model.relu]) as cam:
        expected = cam(input_tensor=images, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(2)])
    assert all(one.std() > 0.05 for one in expected)
    assert np.abs(ours - expected).max() <= 1e-5


def test_ablationcam_checks_its_shortcut_once_per_model_and_falls_back_where_it_is_not_exact(caplog):
    """A forward that flattens with the input's batch size (EfficientNet-Lite0's does) breaks the
    one-copy shortcut: the check sees it on the first call, logs it, and the maps then equal stock
    grad-cam's AblationCAM. On a ResNet the shortcut is exact and taken."""
    from tests.fixtures.tiny_models import batch_bound_cnn
    from xai_audit.tasks.explain import cams

    bound = batch_bound_cnn().eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with caplog.at_level("WARNING", logger="xai_audit.tasks.explain.cams"):
        ours = compute_cams(bound, bound.features[2], images, [0, 1], ["ablationcam"])["ablationcam"]
    assert "not exact here" in caplog.text and "RuntimeError" in caplog.text
    with library.AblationCAM(model=bound, target_layers=[bound.features[2]]) as cam:
        expected = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in (0, 1)])
    assert all(one.std() > 0.05 for one in expected)
    assert np.abs(ours - expected).max() <= 1e-4
    assert cams._SHORTCUT_EXACT[bound] == {id(bound.features[2]): False}
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    compute_cams(resnet, resnet.layer3[-1], images, [0, 1], ["ablationcam"])
    assert cams._SHORTCUT_EXACT[resnet] == {id(resnet.layer3[-1]): True}
