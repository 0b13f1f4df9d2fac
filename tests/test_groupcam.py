"""Group-CAM (tasks/explain/groupcam.py) and ScoreCAM on a channel budget, on constructed ground truth.

Group-CAM's reference here is written in this file from the paper's equations (Zhang, Rao & Yang 2021,
arXiv:2103.13859, Sec. 3: mean-gradient channel weights, G consecutive channel groups summed and ReLU'd,
bilinear upsampling, min-max normalised masks blending the input with its Gaussian blur, weights
relu(softmax score of the blend - that of the blur), weighted sum of the group maps, min-max), with the
blur's constants (kernel 51, sigma 50, reflect border) as the authors' code (github.com/wofmanaf/Group-CAM,
cam/groupcam.py) sets them. It hooks the original model and runs a full backward with plain autograd
and builds its own Gaussian kernel: nothing of grad-cam, torchvision's blur or our inference copy.

The channel budget follows Faster Score-CAM (tabayashi0117/Score-CAM README: "use only channels with
large variances as mask images", max_N; -1 is full Score-CAM).
"""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_grad_cam as library
import torch
import torch.nn.functional as F
import torchvision
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from tests.fixtures import two_regions
from xai_audit.tasks.compute.inference import inference_model
from xai_audit.tasks.explain.cams import BatchedScoreCAM, compute_cams


def reference_groupcam(model: nn.Module, layer: nn.Module, image: torch.Tensor, target: int, groups: int):
    """Group-CAM of one image ``[1, 3, H, W]`` from the paper's equations (module docstring)."""
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        x = image.clone().requires_grad_(False)
        logits = model(x)
        (gradient,) = torch.autograd.grad(logits[0, target], store["a"])
    finally:
        handle.remove()
    activations = store["a"].detach()[0]  # [C, h, w]
    alpha = gradient[0].mean(dim=(1, 2))
    weighted = alpha[:, None, None] * activations
    size = max(1, -(-weighted.shape[0] // groups))  # torch.chunk's group size
    group_maps = torch.stack([weighted[g : g + size].sum(0) for g in range(0, weighted.shape[0], size)])
    group_maps = F.interpolate(group_maps.clamp(min=0)[None], size=image.shape[-2:], mode="bilinear")[0]
    low = group_maps.amin(dim=(1, 2), keepdim=True)
    high = group_maps.amax(dim=(1, 2), keepdim=True)
    masks = torch.where(high > low, (group_maps - low) / (high - low), torch.zeros_like(group_maps))
    half = min(25, min(image.shape[-2:]) - 1)
    offsets = torch.arange(-half, half + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / 50.0) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(image, (half, half, half, half), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    blur = F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
    with torch.no_grad():
        base = torch.softmax(model(blur), dim=-1)[0, target]
        blends = image * masks[:, None] + blur * (1 - masks[:, None])
        scores = torch.softmax(model(blends), dim=-1)[:, target]
    weights = (scores - base).clamp(min=0)
    cam = (weights[:, None, None] * group_maps).sum(0).clamp(min=0)
    cam = cam - cam.min()
    return (cam / cam.max()).numpy()


class Planted(nn.Module):
    """Class 0's evidence is a bright patch on channels 0-3 of the layer; 60 other channels are noise.

    ``features``: 64 channels; channels 0-3 respond to the red channel's intensity (the planted patch
    is red), the others to a fixed random mix of the input. The head reads class 0 from channels 0-3
    only, so the evidence for class 0 lies on the red patch and nowhere else.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.features = nn.Sequential(nn.Conv2d(3, 64, 4, stride=4), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight[:4] = 0.0
            self.features[0].weight[:4, 0] = 0.25
            self.features[0].bias[:4] = -2.5
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, 3)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()
            self.head.weight[0, :4] = 3.0
            self.head.weight[1, 4:] = 0.05

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


BOX = (8, 8, 24, 24)


@pytest.fixture(scope="module")
def planted():
    generator = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, 48, 48, generator=generator) * 0.5
    images[:, 0, BOX[1] : BOX[3], BOX[0] : BOX[2]] = 1.0
    images[1] = images[1].flip(-1)  # second image: the patch on the right
    return Planted().eval(), images


def test_groupcam_puts_its_energy_on_the_planted_evidence(planted):
    model, images = planted
    maps = compute_cams(model, model.features, images, [0, 0], ["groupcam"], groupcam_groups=16)["groupcam"]
    for index, saliency in enumerate(maps):
        mask = np.zeros((48, 48), dtype=bool)
        mask[BOX[1] : BOX[3], BOX[0] : BOX[2]] = True
        if index == 1:
            mask = mask[:, ::-1]
        inside = saliency[mask].sum() / saliency.sum()
        assert inside >= 0.8, (index, inside)  # the box is 11 % of the image


@pytest.mark.parametrize("groups", [5])
def test_groupcam_equals_the_papers_equations(groups):
    """A random ResNet18 (BatchNorm: the inference copy folds it) at layer3, 256 channels; 5 groups:
    torch.chunk's uneven split (52 channels each, the last 48)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = [3, 6]
    ours = compute_cams(model, model.layer3[-1], images, targets, ["groupcam"], groupcam_groups=groups)["groupcam"]
    for index, target in enumerate(targets):
        expected = reference_groupcam(model, model.layer3[-1], images[index : index + 1], target, groups)
        assert expected.std() > 0.05
        assert np.abs(ours[index] - expected).max() <= 1e-4


def test_groupcam_runs_one_forward_per_group_and_one_for_the_blur(planted):
    model, images = planted
    rows = []
    inference_model(model, images).features.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    compute_cams(model, model.features, images, [0, 0], ["groupcam"], groupcam_groups=16, scorecam_batch_size=8)
    assert rows == [1, 8, 8] * 2


def test_groupcam_on_two_regions_explains_each_class_by_its_square():
    model = two_regions.two_region_classifier()
    image = torch.from_numpy(two_regions.two_squares(0)).permute(2, 0, 1)[None].float() / 255
    red, blue = two_regions.CLASS_NAMES.index("red"), two_regions.CLASS_NAMES.index("blue")
    maps = compute_cams(model, model.regions, image.repeat(2, 1, 1, 1), [red, blue], ["groupcam"], groupcam_groups=3)
    for saliency, box in zip(maps["groupcam"], (two_regions.RED_BOX, two_regions.BLUE_BOX)):
        assert saliency[two_regions.box_mask(box)].sum() / saliency.sum() >= 0.9


class VarianceCarriers(nn.Module):
    """A layer of 16 channels where only channels 3, 7 and 12 vary across the image (the rest are
    constant: bias only, zero weights), so Faster Score-CAM's variance ranking must pick exactly those."""

    CARRIERS = (3, 7, 12)

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        with torch.no_grad():
            keep = torch.zeros(16, dtype=torch.bool)
            keep[list(self.CARRIERS)] = True
            self.conv.weight[~keep] = 0.0
            self.conv.bias.copy_(torch.linspace(0.1, 1.6, 16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x))


def _scorecam_weights(model, layer, images, targets, channels):
    cam = BatchedScoreCAM(model, [layer], channels=channels, batch_size=4)
    with torch.no_grad():
        activations = []
        handle = layer.register_forward_hook(lambda m, i, o: activations.append(o))
        model(images)
        handle.remove()
    cam.activations_and_grads.release()
    objects = [ClassifierOutputTarget(t) for t in targets]
    return cam.get_cam_weights(images, layer, objects, activations[0].numpy(), None)


def test_scorecam_budget_scores_only_the_highest_variance_channels():
    model = VarianceCarriers().eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    rows = []
    inference_model(model, images).conv.register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    budget = _scorecam_weights(model, model.conv, images, [1, 2], channels=3)
    assert sum(rows) == 2 * 3  # three masked forwards per image, nothing else
    full = _scorecam_weights(model, model.conv, images, [1, 2], channels=None)
    carriers = list(VarianceCarriers.CARRIERS)
    others = [c for c in range(16) if c not in carriers]
    assert np.all(budget[:, others] == 0.0)
    # the softmax over the chosen channels' scores = the full softmax renormalised over them
    expected = full[:, carriers] / full[:, carriers].sum(axis=1, keepdims=True)
    assert np.allclose(budget[:, carriers], expected, rtol=1e-5)


def test_scorecam_budget_of_every_channel_is_full_scorecam_and_grad_cams():
    torch.manual_seed(9)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)
    )
    model.eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(10))
    full = compute_cams(model, model[1], images, [1, 2], ["scorecam"])["scorecam"]
    for channels in (8, 100):
        budget = compute_cams(model, model[1], images, [1, 2], ["scorecam"], scorecam_channels=channels)["scorecam"]
        assert np.array_equal(budget, full)
    with library.ScoreCAM(model=model, target_layers=[model[1]]) as cam:
        stock = cam(input_tensor=images, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(2)])
    assert all(one.std() > 0.05 for one in stock)
    assert np.abs(full - stock).max() <= 1e-5
