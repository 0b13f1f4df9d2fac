"""``auto`` batch sizes follow the device and the precision, and never change a result."""

from __future__ import annotations

import numpy as np
import torch
import torchvision

from xai_audit.tasks.compute.batch_sizes import CPU_BATCH_SIZES, perturbation_batch_size
from xai_audit.tasks.explain.cams import compute_cams
from xai_audit.tasks.explain.lime import GPU_BATCH_SIZE, default_batch_size


def test_cpu_sizes_depend_on_precision_and_accelerators_get_the_callers_size():
    assert perturbation_batch_size("cpu", None, accelerator=999) == CPU_BATCH_SIZES["fp32"]
    assert perturbation_batch_size("cpu", torch.float32, accelerator=999) == CPU_BATCH_SIZES["fp32"]
    assert perturbation_batch_size(torch.device("cpu"), torch.bfloat16, accelerator=999) == CPU_BATCH_SIZES["mixed"]
    assert perturbation_batch_size("cuda", None, accelerator=999) == 999
    assert default_batch_size("cuda:0", torch.float16) == GPU_BATCH_SIZE
    assert default_batch_size("cpu", torch.bfloat16) == CPU_BATCH_SIZES["mixed"]


def test_scorecam_maps_do_not_depend_on_the_inner_batch():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=6).eval()
    images = torch.rand(2, 3, 48, 48)
    automatic = compute_cams(model, model.layer4, images, [1, 4], ["scorecam"])["scorecam"]
    for inner_batch in (1, 7, 512):
        explicit = compute_cams(model, model.layer4, images, [1, 4], ["scorecam"], scorecam_batch_size=inner_batch)[
            "scorecam"
        ]
        np.testing.assert_allclose(explicit, automatic, atol=1e-5)
