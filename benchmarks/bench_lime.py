"""Target 1: batched LIME vs stock ``lime_image`` with the seed study's settings.

Stock side, as the seed used it: ``LimeImageExplainer.explain_instance`` with batch 10,
1,000 samples, a ``classifier_fn`` that turns lime's uint8 ``[N, H, W, 3]`` batch into a
normalised tensor and returns softmax probabilities, the model as torchvision builds it
(NCHW, fp32). Ours: :func:`tasks.lime_explain.explain_lime` as the pipeline calls it
(channels-last weights during the forwards, batches of 256: the config default). One model
object serves both sides. Both get the same image, the same quickshift segmentation (computed
once, outside the timing) and the same perturbation matrix (stock's ``explain_instance`` is
called without ``random_seed``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from benchmarks.harness import Result, Timing, device_for, interleave
from tasks.memory_format import channels_last_weights

TARGETS = ("1 LIME fp32 speed-up", "1 LIME mixed-precision speed-up", "1 LIME fp32 overhead over the model",
           "1 LIME mixed-precision overhead over the model")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

SETTINGS = {
    # cpu: 300 samples, not 1,000, so two rounds fit a shared 2-core machine; every side's time
    # is linear in the samples (fixed batch sizes), so the ratios carry over.
    "tiny": dict(pixels=64, num_samples=40, arch="resnet18", repeats=1, batch_size=20),
    "cpu": dict(pixels=224, num_samples=300, arch="resnet18", repeats=2, batch_size=256),
    "gpu": dict(pixels=224, num_samples=1000, arch="resnet50", repeats=3, batch_size=256),
}
STOCK_BATCH_SIZE = 10  # the seed study's lime_image batch size


class Normalised(nn.Module):
    """The model on [0, 1] pixels, ImageNet normalisation folded in (what our LIME calls)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        device = next(model.parameters()).device
        self.register_buffer("mean", torch.tensor(MEAN, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD, device=device).view(1, 3, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


def test_image(pixels: int) -> np.ndarray:
    """scikit-image's astronaut photo, resized: a real photo, so quickshift finds real superpixels."""
    from skimage.data import astronaut
    from skimage.transform import resize

    return (resize(astronaut(), (pixels, pixels), anti_aliasing=True) * 255).astype(np.uint8)


def stock_classifier(model: nn.Module, device: torch.device):
    """The seed's ``batch_predict``: uint8 images -> normalised tensor -> softmax, as NumPy."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def batch_predict(images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float().to(device) / 255.0
        with torch.no_grad():
            return torch.softmax(model((batch - mean) / std), dim=1).cpu().numpy()

    return batch_predict


def top5(weights: dict[int, float] | np.ndarray) -> set[int]:
    """The (at most) five superpixels with the largest positive weights."""
    pairs = weights.items() if isinstance(weights, dict) else enumerate(weights)
    ranked = sorted(pairs, key=lambda fw: -fw[1])[:5]
    return {int(f) for f, w in ranked if w > 0}


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(1, len(a | b))


def run(size: str) -> list[Result]:
    import torchvision
    from lime import lime_image

    from tasks.lime_explain import (
        SegmentationCache,
        explain_lime,
        hidden_image,
        neighborhood_probabilities,
        perturbation_matrix,
    )
    from tasks.metrics import autocast_context

    s = SETTINGS[size]
    device = device_for(size)
    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    torch.manual_seed(0)
    model = getattr(torchvision.models, s["arch"])().eval().to(device)  # random weights, both sides
    model_fn = Normalised(model).to(device)
    classify = stock_classifier(model, device)

    image = test_image(s["pixels"])
    cache = SegmentationCache()
    segments = cache.segments(image, "quickshift")
    target = int(np.argmax(classify(image[None])[0]))
    n_segments = int(segments.max()) + 1
    seed = 0

    def stock():
        explanation = lime_image.LimeImageExplainer(random_state=seed).explain_instance(
            image, classify, labels=(target,), top_labels=None, num_samples=s["num_samples"],
            batch_size=STOCK_BATCH_SIZE, segmentation_fn=lambda _: segments)
        return dict(explanation.local_exp[target])

    def ours(amp):
        return lambda: explain_lime(model_fn, [image], [target], num_samples=s["num_samples"], seed=seed,
                                    batch_size=s["batch_size"], device=device, amp_dtype=amp, cache=cache)[0].weights

    batches: list[torch.Tensor] = []
    neighborhood_probabilities(_Recorder(batches), image, hidden_image(image, segments), segments,
                               perturbation_matrix(n_segments, s["num_samples"], seed),
                               batch_size=s["batch_size"], device=device)

    def model_alone(amp):
        """The same perturbed batches, built beforehand, through the same model, layout and precision."""
        def forward():
            with torch.no_grad(), autocast_context(device, amp), channels_last_weights(model_fn):
                return [model_fn(batch).float().cpu() for batch in batches]
        return forward

    # Warm both code paths on a few samples (the timed rounds then run warm, with no untimed full round).
    classify(np.repeat(image[None], STOCK_BATCH_SIZE, axis=0))
    for amp in (None, amp_dtype):
        explain_lime(model_fn, [image], [target], num_samples=s["batch_size"], seed=seed, batch_size=s["batch_size"],
                     device=device, amp_dtype=amp, cache=cache)
    runs = interleave({"stock": stock, "fp32": ours(None), "mixed": ours(amp_dtype),
                       "model fp32": model_alone(None), "model mixed": model_alone(amp_dtype)},
                      repeats=s["repeats"], warmup=0)
    stock_top = top5(runs["stock"][1])
    settings = (f"{s['arch']} random weights, {s['pixels']} px, {s['num_samples']} samples, {n_segments} superpixels, "
                f"stock batch {STOCK_BATCH_SIZE} NCHW, ours batch {s['batch_size']} channels-last")
    fp32 = Timing("lime fp32", runs["fp32"][0], runs["stock"][0], runs["fp32"][1], runs["stock"][1])
    mixed = Timing("lime mixed", runs["mixed"][0], runs["stock"][0], runs["mixed"][1], runs["stock"][1])
    precision = str(amp_dtype).removeprefix("torch.")
    results = [
        Result.speedup(TARGETS[0], fp32, goal=1.3, note=settings,
                       top5_jaccard_vs_stock_fp32=jaccard(top5(fp32.ours_output), stock_top),
                       max_abs_weight_diff=_weight_diff(fp32.ours_output, fp32.stock_output)),
        Result.speedup(TARGETS[1], mixed, goal=2.0, note=f"{precision} autocast; {settings}",
                       top5_jaccard_vs_stock_fp32=jaccard(top5(mixed.ours_output), stock_top),
                       jaccard_goal=0.8),
    ]
    for target, ours_side, model_side in ((TARGETS[2], "fp32", "model fp32"), (TARGETS[3], "mixed", "model mixed")):
        overhead = Timing(target, runs[model_side][0], runs[ours_side][0])  # ratio = ours / model alone
        results.append(Result(target, round(overhead.ratio, 3), 1.15, "max", "x",
                              note="our LIME time / model-only time on the same perturbed batches",
                              extra={"model_only_median_s": round(overhead.ours_median_s, 3),
                                     "lime_median_s": round(overhead.stock_median_s, 3)}))
    return results


class _Recorder(nn.Module):
    """A stand-in model that keeps each batch it is given (to replay them through the real model)."""

    def __init__(self, batches: list) -> None:
        super().__init__()
        self.batches = batches

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.batches.append(batch.clone(memory_format=torch.preserve_format))
        return torch.zeros(batch.shape[0], 2, device=batch.device)


def _weight_diff(ours: np.ndarray, stock: dict[int, float]) -> float:
    expected = np.zeros_like(ours)
    for feature, weight in stock.items():
        expected[feature] = weight
    return float(np.abs(ours - expected).max())
