"""Target 1: batched LIME vs stock ``lime_image`` with the seed study's settings.

Stock side, as the seed used it: ``LimeImageExplainer.explain_instance`` with batch 10,
1,000 samples and the ``batch_predict`` of lime's PyTorch image tutorial (``Tutorial - images -
Pytorch.ipynb``: each uint8 ``[H, W, 3]`` image through ``ToTensor`` and ``Normalize``,
``torch.stack``, softmax), the model as torchvision builds it (NCHW, fp32). A second stock
classifier, reported beside the target, permutes the whole uint8 batch instead: its tensor is
channels-last by stride, so torch runs the unchanged model channels-last (how much of our
speed-up is layout alone). Ours: :func:`xai_audit.tasks.explain.lime.explain_lime` as the pipeline calls
it (the model's inference copy: BatchNorm folded, channels-last, packed weights; normalisation
applied once per image; batches of the config's default size for the device and precision).
One model object serves every side. All get the same image, the same quickshift segmentation
(computed once, outside the timing) and the same perturbation matrix (stock's
``explain_instance`` is called without ``random_seed``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from benchmarks.harness import Result, Timing, device_for, interleave
from xai_audit.tasks.compute.inference import inference_model

TARGETS = (
    "1 LIME fp32 speed-up",
    "1 LIME mixed-precision speed-up",
    "1 LIME fp32 overhead over the model",
    "1 LIME mixed-precision overhead over the model",
    "1 LIME fp32 speed-up vs a channels-last stock classifier",
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

SETTINGS = {
    # cpu: 300 samples, not 1,000, so two rounds fit a shared 2-core machine; every side's time
    # is linear in the samples (fixed batch sizes), so the ratios carry over.
    "tiny": dict(pixels=64, num_samples=40, arch="resnet18", repeats=1, batch_size=20),
    "cpu": dict(pixels=224, num_samples=300, arch="resnet18", repeats=3, batch_size=None),  # None: the device's default
    "gpu": dict(pixels=224, num_samples=1000, arch="resnet50", repeats=3, batch_size=None),
}
STOCK_BATCH_SIZE = 10  # the seed study's lime_image batch size


def test_image(pixels: int) -> np.ndarray:
    """scikit-image's astronaut photo, resized: a real photo, so quickshift finds real superpixels."""
    from skimage.data import astronaut
    from skimage.transform import resize

    return (resize(astronaut(), (pixels, pixels), anti_aliasing=True) * 255).astype(np.uint8)


def stock_classifier(model: nn.Module, device: torch.device, mean=MEAN, std=STD):
    """lime's PyTorch tutorial ``batch_predict``: per-image ToTensor + Normalize, stacked (NCHW) -> softmax."""
    from torchvision import transforms

    preprocess = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean=mean, std=std)])

    def batch_predict(images: np.ndarray) -> np.ndarray:
        batch = torch.stack(tuple(preprocess(image) for image in images), dim=0).to(device)
        with torch.no_grad():
            return torch.softmax(model(batch), dim=1).cpu().numpy()

    return batch_predict


def permuting_classifier(model: nn.Module, device: torch.device):
    """A ``batch_predict`` that permutes the uint8 batch: channels-last strides, so a channels-last forward."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def batch_predict(images: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float().to(device) / 255.0
        with torch.no_grad():
            return torch.softmax(model((batch - mean) / std), dim=1).cpu().numpy()

    return batch_predict


def stock_lime(image: np.ndarray, classify, segments: np.ndarray, target: int, num_samples: int, seed: int) -> dict:
    """Stock lime_image's weights ``{superpixel: weight}`` of ``target`` on our superpixels."""
    from lime import lime_image

    explanation = lime_image.LimeImageExplainer(random_state=seed).explain_instance(
        image,
        classify,
        labels=(target,),
        top_labels=None,
        num_samples=num_samples,
        batch_size=STOCK_BATCH_SIZE,
        segmentation_fn=lambda _: segments,
    )
    return dict(explanation.local_exp[target])


def top5(weights: dict[int, float] | np.ndarray) -> set[int]:
    """The (at most) five superpixels with the largest positive weights."""
    pairs = weights.items() if isinstance(weights, dict) else enumerate(weights)
    ranked = sorted(pairs, key=lambda fw: -fw[1])[:5]
    return {int(f) for f, w in ranked if w > 0}


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(1, len(a | b))


def run(size: str) -> list[Result]:
    import torchvision

    from xai_audit.tasks.compute.precision import autocast_context
    from xai_audit.tasks.data.models import PixelModel
    from xai_audit.tasks.explain.lime import (
        SegmentationCache,
        default_batch_size,
        explain_lime,
        hidden_image,
        neighborhood_probabilities,
        perturbation_matrix,
    )

    s = dict(SETTINGS[size])
    device = device_for(size)
    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    # what the pipeline's `auto` picks for each precision
    batch_sizes = {amp: s["batch_size"] or default_batch_size(device, amp) for amp in (None, amp_dtype)}
    torch.manual_seed(0)
    model = getattr(torchvision.models, s["arch"])().eval().to(device)  # random weights, both sides
    model_fn = PixelModel(model, MEAN, STD)
    classify = stock_classifier(model, device)
    classify_channels_last = permuting_classifier(model, device)

    image = test_image(s["pixels"])
    cache = SegmentationCache()
    segments = cache.segments(image, "quickshift")
    target = int(np.argmax(classify(image[None])[0]))
    n_segments = int(segments.max()) + 1
    seed = 0

    def stock(classifier=classify):
        return stock_lime(image, classifier, segments, target, s["num_samples"], seed)

    def ours(amp):
        return lambda: (
            explain_lime(
                model_fn,
                [image],
                [target],
                num_samples=s["num_samples"],
                seed=seed,
                batch_size=batch_sizes[amp],
                device=device,
                amp_dtype=amp,
                cache=cache,
            )[0].weights
        )

    def model_alone(amp):
        """The same perturbed batches, built beforehand, through the same network, layout and precision."""
        batches = _Batches()  # the network's inputs exactly as ours builds them (normalised once per image)
        neighborhood_probabilities(
            PixelModel(_Recorder(batches), MEAN, STD),
            image,
            hidden_image(image, segments),
            segments,
            perturbation_matrix(n_segments, s["num_samples"], seed),
            batch_size=batch_sizes[amp],
            device=device,
        )
        fast = inference_model(model)

        def forward():
            with torch.no_grad(), autocast_context(device, amp):
                return [fast(batch).float().cpu() for batch in batches]

        return forward

    # Warm both code paths on a few samples (the timed rounds then run warm, with no untimed full round).
    classify(np.repeat(image[None], STOCK_BATCH_SIZE, axis=0))
    classify_channels_last(np.repeat(image[None], STOCK_BATCH_SIZE, axis=0))
    for amp in (None, amp_dtype):
        explain_lime(
            model_fn,
            [image],
            [target],
            num_samples=batch_sizes[amp],
            seed=seed,
            batch_size=batch_sizes[amp],
            device=device,
            amp_dtype=amp,
            cache=cache,
        )
    runs = interleave(
        {
            "stock": stock,
            "stock channels-last": lambda: stock(classify_channels_last),
            "fp32": ours(None),
            "mixed": ours(amp_dtype),
            "model fp32": model_alone(None),
            "model mixed": model_alone(amp_dtype),
        },
        repeats=s["repeats"],
        warmup=0,
    )
    stock_top = top5(runs["stock"][1])
    settings = (
        f"{s['arch']} random weights, {s['pixels']} px, {s['num_samples']} samples, {n_segments} superpixels, "
        f"stock batch {STOCK_BATCH_SIZE} (lime's PyTorch tutorial batch_predict, NCHW), ours batch {batch_sizes[None]} "
        f"fp32 / {batch_sizes[amp_dtype]} mixed (BatchNorm folded, channels-last, packed weights)"
    )
    fp32 = Timing("lime fp32", runs["fp32"][0], runs["stock"][0], runs["fp32"][1], runs["stock"][1])
    mixed = Timing("lime mixed", runs["mixed"][0], runs["stock"][0], runs["mixed"][1], runs["stock"][1])
    precision = str(amp_dtype).removeprefix("torch.")
    results = [
        Result.speedup(
            TARGETS[0],
            fp32,
            goal=1.3,
            note=settings,
            top5_jaccard_vs_stock_fp32=jaccard(top5(fp32.ours_output), stock_top),
            max_abs_weight_diff=_weight_diff(fp32.ours_output, fp32.stock_output),
        ),
        Result.speedup(
            TARGETS[1],
            mixed,
            goal=2.0,
            note=f"{precision} autocast; {settings}",
            top5_jaccard_vs_stock_fp32=jaccard(top5(mixed.ours_output), stock_top),
            jaccard_goal=0.8,
        ),
    ]
    layout = Timing(
        "lime fp32 vs channels-last stock",
        runs["fp32"][0],
        runs["stock channels-last"][0],
        runs["fp32"][1],
        runs["stock channels-last"][1],
    )
    results.append(
        Result.speedup(
            TARGETS[4],
            layout,
            goal=None,
            note="stock's classifier_fn permutes the uint8 batch (channels-last strides), else as above",
            top5_jaccard_vs_stock_fp32=jaccard(top5(layout.ours_output), top5(layout.stock_output)),
        )
    )
    for target, ours_side, model_side in ((TARGETS[2], "fp32", "model fp32"), (TARGETS[3], "mixed", "model mixed")):
        overhead = Timing(target, runs[model_side][0], runs[ours_side][0])  # ratio = ours / model alone
        results.append(
            Result(
                target,
                round(overhead.ratio, 3),
                1.15,
                "max",
                "x",
                note="our LIME time / model-only time on the same perturbed batches",
                extra={
                    "model_only_median_s": round(overhead.ours_median_s, 3),
                    "lime_median_s": round(overhead.stock_median_s, 3),
                },
            )
        )
    return results + adaptive_results(size)


class _Batches(list):
    """The recorded batches; shared, not copied, with the recorder's inference copy."""

    def __deepcopy__(self, memo: dict) -> _Batches:
        return self


class _Recorder(nn.Module):
    """A stand-in model that keeps each batch it is given (to replay them through the real model)."""

    def __init__(self, batches: _Batches) -> None:
        super().__init__()
        self.batches = batches

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):  # not torch.fx's symbolic stand-in while the copy is traced
            self.batches.append(batch.clone(memory_format=torch.preserve_format))
        return torch.zeros(batch.shape[0], 2, device=batch.device)


def _weight_diff(ours: np.ndarray, stock: dict[int, float]) -> float:
    expected = np.zeros_like(ours)
    for feature, weight in stock.items():
        expected[feature] = weight
    return float(np.abs(ours - expected).max())


# --------------------------------------------------------------------------------------------
# Adaptive LIME (explain.lime.adaptive) vs stock lime_image at a fixed 1,000 samples

ADAPTIVE_TARGETS = (
    "1 adaptive LIME fp32 speed-up vs stock 1,000 samples",
    "1 adaptive LIME mixed-precision speed-up vs stock 1,000 samples",
    "1 adaptive LIME fewer model evaluations than stock 1,000 samples",
    "1 adaptive LIME top-5 Jaccard with a 5,000-sample reference",
)

ADAPTIVE_SETTINGS = {
    # cpu: one image of each kind (the 5,000-sample reference is most of the cost); tiny: seconds,
    # random weights, so its Jaccards mean nothing.
    "tiny": dict(pixels=64, cap=48, reference=96, images=1, round_size=16, trained=False),
    "cpu": dict(pixels=224, cap=1000, reference=5000, images=1, round_size=None, trained=True),
    "gpu": dict(pixels=224, cap=1000, reference=5000, images=4, round_size=None, trained=True),
}
REFERENCE_SEED = 1
"""The reference draws its own perturbations (seed 1), so it shares no samples with the timed runs (seed 0)."""


def adaptive_cases(size: str, device: torch.device) -> list[tuple[str, str, nn.Module, tuple, tuple, np.ndarray]]:
    """``(kind, image name, model, mean, std, image)``: world images under the demo ResNet18 (trained on the
    world) and scikit-image's photos under EfficientNet-Lite0's ImageNet weights (no ResNet18 ImageNet weights
    offline); ``tiny``: a freshly rendered world scene and the astronaut under a random-weight ResNet18."""
    import torchvision
    from PIL import Image

    from xai_audit.tasks.core.config import WorldConfig
    from xai_audit.tasks.world.synthetic import render, sample_scene

    s = ADAPTIVE_SETTINGS[size]
    side = (s["pixels"], s["pixels"])
    cases = []
    if not s["trained"]:
        torch.manual_seed(0)
        model = torchvision.models.resnet18().eval().to(device)
        rng = np.random.default_rng(0)
        scene = render(sample_scene(rng, WorldConfig()), rng, WorldConfig().image_size)[0]
        world = np.asarray(Image.fromarray(scene).resize(side, Image.BILINEAR))
        return [
            ("world", "rendered scene", model, MEAN, STD, world),
            ("photos", "astronaut", model, MEAN, STD, test_image(s["pixels"])),
        ]
    from xai_audit.examples.real_photos import efficientnet_lite0, photo
    from xai_audit.tasks.world.demo_model import MEAN as DEMO_MEAN
    from xai_audit.tasks.world.demo_model import STD as DEMO_STD
    from xai_audit.tasks.world.demo_model import ensure_demo_model, load_demo_model
    from xai_audit.tasks.world.synthetic import ensure_world, read_attributes

    demo, _ = load_demo_model(ensure_demo_model())
    root = ensure_world()
    for row in read_attributes(root, "val")[: s["images"]]:
        image = np.asarray(Image.open(root / "images" / row["image"]).convert("RGB").resize(side, Image.BILINEAR))
        cases.append(("world", row["image"], demo.to(device), DEMO_MEAN, DEMO_STD, image))
    lite0 = efficientnet_lite0().to(device)
    for name in ("chelsea", "coffee", "rocket", "astronaut")[: s["images"]]:
        image = np.asarray(photo(name).resize(side, Image.BILINEAR))
        cases.append(("photos", name, lite0, (127 / 255,) * 3, (128 / 255,) * 3, image))
    return cases


def adaptive_results(size: str) -> list[Result]:
    """Per image kind: adaptive LIME (the config's defaults, fp32 and mixed) and stock ``lime_image`` at 1,000
    samples, side by side; both top-5 sets against our fixed-N fp32 LIME at 5,000 samples (which equals stock
    lime's explanation for the same perturbations: tests/test_lime_explain.py)."""
    from xai_audit.tasks.core.config import AdaptiveLimeConfig
    from xai_audit.tasks.explain.lime import SegmentationCache
    from xai_audit.tasks.explain.lime_convergence import AdaptiveSettings

    s = ADAPTIVE_SETTINGS[size]
    device = device_for(size)
    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    defaults = AdaptiveLimeConfig().model_dump(exclude={"enabled"})
    rule = AdaptiveSettings(**{**defaults, **({"round_size": s["round_size"]} if s["round_size"] else {})})
    cache = SegmentationCache()
    per_kind: dict[str, dict[str, list]] = {}
    for kind, name, model, mean, std, image in adaptive_cases(size, device):
        times, measured = _adaptive_case(s, rule, device, amp_dtype, cache, model, mean, std, image)
        record = per_kind.setdefault(kind, {key: [] for key in ("names", "stock", "fp32", "mixed", "j")})
        record["names"].append(name)
        for side, seconds in times.items():
            record[side] += seconds
        record["j"].append(measured)
    precision = str(amp_dtype).removeprefix("torch.")
    results = []
    for kind, record in per_kind.items():
        models = (
            "demo ResNet18 (trained on the world)"
            if kind == "world" and s["trained"]
            else "EfficientNet-Lite0 ImageNet weights (ResNet18's are not available offline)"
            if s["trained"]
            else "random-weight ResNet18"
        )
        note = (
            f"{kind} ({', '.join(record['names'])}), {models}, {s['pixels']} px, cap {s['cap']}, "
            f"rounds of {rule.round_size}, top-{rule.top_k} stable over {rule.stable_rounds} refits, z {rule.z}; "
            f"stock lime_image at {s['cap']} samples, batch {STOCK_BATCH_SIZE}; reference: our fixed-N fp32 LIME "
            f"at {s['reference']} samples, seed {REFERENCE_SEED}"
        )
        mean_j = {key: float(np.mean([j[key] for j in record["j"]])) for key in ("stock", "fp32", "mixed")}
        samples = float(np.mean([j["samples_fp32"] for j in record["j"]]))
        extra = {"per_image": record["j"], "top5_jaccard_stock_vs_reference": round(mean_j["stock"], 3)}
        results += [
            Result.speedup(
                f"{ADAPTIVE_TARGETS[0]} ({kind})",
                Timing(kind, record["fp32"], record["stock"]),
                goal=4.0,
                note=note,
                **extra,
            ),
            Result.speedup(
                f"{ADAPTIVE_TARGETS[1]} ({kind})",
                Timing(kind, record["mixed"], record["stock"]),
                goal=8.0,
                note=f"{precision} autocast; {note}",
                top5_jaccard_mixed_vs_reference=round(mean_j["mixed"], 3),
            ),
            Result(
                f"{ADAPTIVE_TARGETS[2]} ({kind})",
                round(s["cap"] / samples, 3),
                3.0,
                "min",
                "x",
                note=f"stock's {s['cap']} / adaptive fp32's mean samples used ({samples:.0f}); {note}",
                extra={"mean_samples_used_fp32": samples},
            ),
            Result(
                f"{ADAPTIVE_TARGETS[3]} ({kind})",
                round(mean_j["fp32"], 3),
                round(mean_j["stock"], 3),
                "min",
                "",
                note=f"goal: stock {s['cap']}'s own top-5 Jaccard with the reference; {note}",
                extra=extra,
            ),
        ]
    return results


def _adaptive_case(s, rule, device, amp_dtype, cache, model, mean, std, image) -> tuple[dict[str, list], dict]:
    """One image: each side's seconds (one round: stock at 1,000 samples is the slow side) and the top-5 Jaccards."""
    from xai_audit.tasks.data.models import PixelModel
    from xai_audit.tasks.explain.lime import default_batch_size, explain_lime

    model_fn = PixelModel(model, mean, std)
    classify = stock_classifier(model, device, mean, std)
    segments = cache.segments(image, "quickshift")
    target = int(np.argmax(classify(image[None])[0]))

    def ours(amp, samples=s["cap"], seed=0, adaptive=rule):
        return explain_lime(
            model_fn,
            [image],
            [target],
            num_samples=samples,
            seed=seed,
            batch_size=default_batch_size(device, amp),
            device=device,
            amp_dtype=amp,
            cache=cache,
            adaptive=adaptive,
        )[0]

    def stock():
        return stock_lime(image, classify, segments, target, s["cap"], 0)

    reference = top5(ours(None, s["reference"], REFERENCE_SEED, None).weights)
    for amp in (None, amp_dtype):  # warm each path on one batch
        ours(amp, default_batch_size(device, amp), 0, None)
    classify(np.repeat(image[None], STOCK_BATCH_SIZE, axis=0))
    runs = interleave({"stock": stock, "fp32": lambda: ours(None), "mixed": lambda: ours(amp_dtype)}, 1, 0)
    fp32, mixed = runs["fp32"][1], runs["mixed"][1]
    measured = {
        "stock": jaccard(top5(runs["stock"][1]), reference),
        "fp32": jaccard(top5(fp32.weights), reference),
        "mixed": jaccard(top5(mixed.weights), reference),
        "samples_fp32": fp32.samples_used,
        "samples_mixed": mixed.samples_used,
        "superpixels": int(segments.max()) + 1,
    }
    return {side: runs[side][0] for side in ("stock", "fp32", "mixed")}, measured
