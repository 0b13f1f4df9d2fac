"""The inference copy: BatchNorm folded only where the data flow allows it, outputs unchanged."""

from __future__ import annotations

import pytest
import torch
import torchvision
from pytorch_grad_cam import GradCAM
from torch import nn

from xai_audit.tasks.compute.inference import conv_bn_pairs, fold_batchnorm, inference_model


def _with_running_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms (fresh ones are the identity map)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(size, generator=generator) * 0.4 - 0.2)
    return model.eval()


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


class ResidualConv(nn.Module):
    """conv -> bn, but the conv's output is also added back: the BatchNorm must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.conv(x)
        return self.head(self.bn(features) + features)


class PreActivation(nn.Module):
    """bn -> conv (a pre-activation block): nothing to fold."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x)).mean(dim=(2, 3))


class SharedBatchNorm(nn.Module):
    """One BatchNorm after two convolutions: folding it into either would change the other."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.bn(self.a(x)) + self.bn(self.b(x))).mean(dim=(2, 3))


class CheckedWrapper(nn.Module):
    """Data-dependent control flow (untraceable by torch.fx) around a traceable network."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.module(x)
        if not torch.isfinite(logits).all():
            raise FloatingPointError("non-finite logits")
        return logits


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models_fold_every_batchnorm_and_keep_their_logits(arch):
    torch.manual_seed(0)
    model = _with_running_stats(getattr(torchvision.models, arch)())
    images = torch.rand(3, 3, 96, 96)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    with torch.no_grad():
        assert _relative_difference(model(images), folded(images)) < 1e-5


@pytest.mark.parametrize("model_class", [ResidualConv, PreActivation, SharedBatchNorm])
def test_batchnorms_whose_data_flow_forbids_folding_are_kept(model_class):
    torch.manual_seed(1)
    model = _with_running_stats(model_class())
    images = torch.rand(2, 3, 12, 12)
    folded = fold_batchnorm(model)
    assert isinstance(folded.get_submodule("bn"), nn.BatchNorm2d)
    assert all(bn != "bn" for _, bn in conv_bn_pairs(model))
    with torch.no_grad():
        assert _relative_difference(model(images), folded(images)) < 1e-6


def test_residual_block_folds_only_its_head():
    model = _with_running_stats(ResidualConv())
    assert conv_bn_pairs(model) == [("head.0", "head.1")]


def test_untraceable_wrapper_keeps_its_forward_and_folds_inside():
    torch.manual_seed(2)
    wrapper = CheckedWrapper(_with_running_stats(torchvision.models.resnet18(num_classes=5))).eval()
    fast = inference_model(wrapper)
    assert type(fast) is CheckedWrapper
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert _relative_difference(wrapper(images), fast(images.contiguous(memory_format=torch.channels_last))) < 1e-5
        with pytest.raises(FloatingPointError):
            fast(torch.full((1, 3, 64, 64), float("nan")))


def test_copy_has_channels_last_weights_no_gradients_and_the_models_own_hooks():
    model = _with_running_stats(torchvision.models.resnet18(num_classes=4))
    model.fc.register_forward_hook(lambda module, inputs, output: output * 0 + 7)  # part of the model's behaviour
    fast = inference_model(model)
    with torch.no_grad():
        assert torch.equal(fast(torch.rand(1, 3, 64, 64)), torch.full((1, 4), 7.0))
    assert fast.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.requires_grad for p in fast.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_live_gradcam_recorders_stay_on_the_original_only():
    model = _with_running_stats(torchvision.models.resnet18(num_classes=4))
    own_calls = []
    model.layer4.register_forward_hook(lambda *_: own_calls.append(1))
    with GradCAM(model=model, target_layers=[model.layer4]) as cam:
        hooks_before = list(model.layer4._forward_hooks.values())
        fast = inference_model(model)
        with torch.no_grad():
            fast(torch.rand(2, 3, 64, 64))
        assert cam.activations_and_grads.activations == []  # the copy recorded nothing
        assert own_calls == [1]  # tracing did not call the original's hooks; the copy's own hook ran once
        assert list(model.layer4._forward_hooks.values()) == hooks_before  # recorders back, in order
        with torch.no_grad():
            model(torch.rand(2, 3, 64, 64))
        assert len(cam.activations_and_grads.activations) == 1


def test_copy_is_reused_until_the_weights_change():
    torch.manual_seed(3)
    model = _with_running_stats(torchvision.models.resnet18(num_classes=4))
    images = torch.rand(2, 3, 64, 64)
    first = inference_model(model)
    assert inference_model(model) is first
    with torch.no_grad():
        model.fc.weight.mul_(-1)
        model.layer1[0].bn1.running_mean.add_(0.3)
    second = inference_model(model)
    assert second is not first
    with torch.no_grad():
        assert _relative_difference(model(images), second(images)) < 1e-5
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    assert inference_model(model) is not second  # new tensors: rebuilt


def test_only_eval_mode_batchnorms_are_folded():
    torch.manual_seed(4)
    model = _with_running_stats(torchvision.models.resnet18(num_classes=3))
    model.layer2.train()  # its BatchNorms normalise by batch statistics
    folded = fold_batchnorm(model)
    kept = {name for name, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert kept and all(name.startswith("layer2.") for name in kept)
    assert isinstance(folded.layer1[0].bn1, nn.Identity)
    images = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        assert _relative_difference(model(images), folded(images)) < 1e-5


def test_switching_modes_rebuilds_the_copy():
    model = _with_running_stats(torchvision.models.resnet18(num_classes=3))
    evaluated = inference_model(model)
    model.train()
    trained = inference_model(model)
    assert trained is not evaluated
    assert any(isinstance(m, nn.BatchNorm2d) for m in trained.modules())


def test_a_fresh_wrapper_in_training_mode_still_folds_its_eval_mode_network():
    wrapper = CheckedWrapper(_with_running_stats(torchvision.models.resnet18(num_classes=3)))
    assert wrapper.training  # modules start in training mode; the network inside is in eval mode
    assert not any(isinstance(m, nn.BatchNorm2d) for m in inference_model(wrapper).modules())


def test_non_modules_pass_through():
    def model_fn(x):
        return x

    assert inference_model(model_fn) is model_fn


def test_channels_last_scope_gives_back_the_original_storage_so_the_cached_copy_survives():
    from xai_audit.tasks.compute.memory_format import channels_last_weights

    model = _with_running_stats(torchvision.models.resnet18(num_classes=4))
    fast = inference_model(model)
    pointers = [p.data_ptr() for p in model.parameters()]
    with channels_last_weights(model):  # what AblationCAM's forwards run under
        assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert [p.data_ptr() for p in model.parameters()] == pointers
    assert model.conv1.weight.is_contiguous()
    assert inference_model(model) is fast
