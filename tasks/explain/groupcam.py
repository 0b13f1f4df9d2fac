"""Group-CAM (Zhang, Rao & Yang 2021, arXiv:2103.13859): a few dozen masked forwards instead of one per channel.

No library ships it, so it is a grad-cam ``BaseCAM`` subclass: the CAM family's shared pass
(:func:`xai_audit.tasks.explain.cams.forward_with_cams`) hands it the layer's activations and gradients
(with grad-cam's ``reshape_transform`` applied), and grad-cam's ``compute_cam_per_layer`` clips
and min-max scales its map like every other member's. What it computes follows the authors' code
(github.com/wofmanaf/Group-CAM, ``cam/groupcam.py``, read for this module):

1. each channel ``A_k`` is weighted by its mean gradient ``alpha_k`` of the target logit (Grad-CAM's weights);
2. the weighted channels are split into ``G`` consecutive groups (``torch.chunk``) and summed per
   group, ReLU'd, bilinearly upsampled to the input (``align_corners=False``): the group maps ``M_g``;
3. each ``M_g``, min-max normalised, blends the input ``x`` with its Gaussian blur ``b`` (kernel 51,
   sigma 50, reflect border, as kornia's ``gaussian_blur2d`` in the reference; a constant group map,
   where the reference divides 0 by 0, is an all-blur mask here and weighs nothing either way):
   ``x * m_g + b * (1 - m_g)``; one forward scores all ``G`` blends;
4. the weight of group ``g`` is ``relu(p_c(blend_g) - p_c(b))``, ``p_c`` the softmax probability
   of the target class; the map is ``sum_g weight_g * M_g``, min-max scaled.

The masked forwards go through the model's inference copy (:mod:`xai_audit.tasks.compute.inference`),
channels-last and in inner batches, as BatchedScoreCAM's do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pytorch_grad_cam.base_cam import BaseCAM
from torch import Tensor, nn
from torchvision.transforms.functional import gaussian_blur

from xai_audit.tasks.compute.batch_sizes import perturbation_batch_size
from xai_audit.tasks.compute.inference import inference_model
from xai_audit.tasks.compute.precision import autocast_context

BLUR_KERNEL = 51
"""The reference's Gaussian kernel size (shrunk to fit inputs under 26 px: reflect padding needs it)."""
BLUR_SIGMA = 50.0
"""The reference's Gaussian sigma, in pixels."""
GPU_GROUPCAM_BATCH_SIZE = 64
"""Blended images per forward on accelerators when none is given (ScoreCAM's)."""


def blurred(images: Tensor) -> Tensor:
    """The reference's baseline: a wide Gaussian blur of the (normalised) model input, reflect border."""
    kernel = min(BLUR_KERNEL, 2 * min(images.shape[-2:]) - 1)
    kernel -= 1 - kernel % 2
    return gaussian_blur(images, [kernel, kernel], [BLUR_SIGMA, BLUR_SIGMA])


class GroupCAM(BaseCAM):
    """Group-CAM as a grad-cam class (module docstring); ``groups``: G, the paper's default 32."""

    def __init__(
        self,
        model: nn.Module,
        target_layers: list[nn.Module],
        reshape_transform: Callable | None = None,
        groups: int = 32,
        batch_size: int | None = None,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(model, target_layers, reshape_transform=reshape_transform, uses_gradients=True)
        self.groups = groups
        self.batch_size = batch_size
        self.amp_dtype = amp_dtype

    def get_cam_image(self, input_tensor, target_layer, targets, activations, grads, eigen_smooth=False):
        """``[B, H, W]`` Group-CAM maps at the input's size (unscaled; grad-cam min-max scales them)."""
        activations = torch.as_tensor(activations, dtype=torch.float32)
        grads = torch.as_tensor(grads, dtype=torch.float32)
        size = input_tensor.shape[-2:]
        weighted = grads.mean(dim=(2, 3), keepdim=True) * activations
        groups = torch.stack([chunk.sum(dim=1) for chunk in weighted.chunk(self.groups, dim=1)], dim=1)
        group_maps = F.interpolate(F.relu(groups), size=size, mode="bilinear", align_corners=False)
        flat = group_maps.flatten(2)
        low, high = flat.min(dim=-1, keepdim=True)[0], flat.max(dim=-1, keepdim=True)[0]
        masks = ((flat - low) / (high - low)).view_as(group_maps).nan_to_num(0.0)
        weights = self._group_weights(input_tensor, targets, masks)
        return (weights[:, :, None, None] * group_maps).sum(dim=1).numpy()

    def _group_weights(self, input_tensor: Tensor, targets, masks: Tensor) -> Tensor:
        """``[B, G]``: relu(target probability of each blend - that of the blurred image)."""
        model = inference_model(self.model, input_tensor)
        batch_size = self.batch_size or perturbation_batch_size(
            self.device, self.amp_dtype, accelerator=GPU_GROUPCAM_BATCH_SIZE
        )
        weights = torch.empty(masks.shape[:2], dtype=torch.float32)
        with torch.no_grad():
            for image, target in enumerate(targets):
                x = input_tensor[image : image + 1]
                baseline = blurred(x)
                image_masks = masks[image][:, None].to(x.device)
                scores = [self._probability(model, baseline, target)]
                for start in range(0, len(image_masks), batch_size):
                    mask = image_masks[start : start + batch_size]
                    scores.append(self._probability(model, x * mask + baseline * (1 - mask), target))
                scores = torch.cat(scores)
                weights[image] = F.relu(scores[1:] - scores[0])
        return weights

    def _probability(self, model: nn.Module, batch: Tensor, target) -> Tensor:
        if batch.dim() == 4:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.device, self.amp_dtype):
            outputs = model(batch)
        return torch.atleast_1d(target(torch.softmax(outputs.float(), dim=-1))).float().cpu()
