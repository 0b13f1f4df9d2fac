"""Targets 2 and 3: our CAMs vs the grad-cam package called the way the seed study called it.

Stock side: one grad-cam object per method (``ScoreCAM(model, target_layers=[layer])`` etc.,
default inner batch sizes), called on the image batch with ``ClassifierOutputTarget`` targets;
each object is created and released inside the timed call, so its hooks never touch the other
side's forwards. Ours: :func:`tasks.explain.cams.forward_with_cams` with the pipeline's defaults, which
also returns the logits. Both sides use the same model object, inputs and targets.
"""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.harness import Result, Timing, device_for, interleave

TARGETS = (
    "2 ScoreCAM fp32 speed-up",
    "2 AblationCAM fp32 speed-up",
    "2 ScoreCAM mixed-precision speed-up",
    "2 AblationCAM mixed-precision speed-up",
    "3 gradient CAM family speed-up",
)

GRADIENT_FAMILY = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")

SETTINGS = {
    # perturbation CAMs: images per call; gradient family: images per chunk. cpu uses 128 px:
    # stock ScoreCAM needs 512 full forwards per image (~3.5 min at 224 px on a loaded 2-core box).
    "tiny": dict(arch="resnet18", pixels=64, perturbation_images=1, chunk=2, repeats=1),
    "cpu": dict(arch="resnet18", pixels=128, perturbation_images=1, chunk=8, repeats=3),
    "gpu": dict(arch="resnet50", pixels=224, perturbation_images=2, chunk=32, repeats=3),
}


INNER_BATCHES = (
    "inner batches: stock grad-cam's defaults (ScoreCAM 16, AblationCAM 32), ours the config's "
    "(ScoreCAM auto: 16 fp32 / 32 mixed on CPUs, 64 on GPUs; AblationCAM 128)"
)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def run(size: str) -> list[Result]:
    import pytorch_grad_cam as library
    import torchvision
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from tasks.explain.cams import forward_with_cams

    s = SETTINGS[size]
    device = device_for(size)
    amp_dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    torch.manual_seed(0)
    model = getattr(torchvision.models, s["arch"])().eval().to(device)  # random weights
    layer = model.layer4[-1]
    generator = torch.Generator().manual_seed(1)
    chunk = torch.randn(s["chunk"], 3, s["pixels"], s["pixels"], generator=generator).to(device)
    with torch.no_grad():
        chunk_targets = model(chunk).argmax(dim=-1).tolist()
    images, targets = chunk[: s["perturbation_images"]], chunk_targets[: s["perturbation_images"]]

    def stock(cls, batch, chosen):
        def call():
            with cls(model=model, target_layers=[layer]) as cam:
                return cam(input_tensor=batch, targets=[ClassifierOutputTarget(t) for t in chosen])

        return call

    def stock_family():
        return {
            name: stock(cls, chunk, chunk_targets)()
            for name, cls in zip(
                GRADIENT_FAMILY,
                (library.GradCAM, library.GradCAMPlusPlus, library.XGradCAM, library.LayerCAM, library.HiResCAM),
            )
        }

    def ours(methods, batch, chosen, amp=None):
        return lambda: forward_with_cams(model, layer, batch, chosen, methods, amp_dtype=amp)[1]

    # Warm every path once on one small image (the timed rounds then run warm).
    small = chunk[:1, :, :32, :32]
    forward_with_cams(model, layer, small, chunk_targets[:1], ["scorecam", "ablationcam", *GRADIENT_FAMILY])
    runs = interleave(
        {
            "stock scorecam": stock(library.ScoreCAM, images, targets),
            "scorecam": ours(["scorecam"], images, targets),
            "scorecam mixed": ours(["scorecam"], images, targets, amp_dtype),
            "stock ablationcam": stock(library.AblationCAM, images, targets),
            "ablationcam": ours(["ablationcam"], images, targets),
            "ablationcam mixed": ours(["ablationcam"], images, targets, amp_dtype),
            "stock family": stock_family,
            "family": ours(list(GRADIENT_FAMILY), chunk, chunk_targets),
        },
        repeats=s["repeats"],
        warmup=0,
    )

    setting = f"{s['arch']} random weights, layer4, {s['pixels']} px"
    precision = str(amp_dtype).removeprefix("torch.")
    results = []
    for method, target, mixed_target in (("scorecam", TARGETS[0], TARGETS[2]), ("ablationcam", TARGETS[1], TARGETS[3])):
        stock_times, stock_maps = runs[f"stock {method}"]
        fp32 = Timing(method, runs[method][0], stock_times, runs[method][1][method], stock_maps)
        difference = float(np.abs(fp32.ours_output - stock_maps).max())
        results.append(
            Result.speedup(
                target,
                fp32,
                goal=1.5,
                note=f"{setting}, {len(targets)} image(s); {INNER_BATCHES}",
                max_abs_diff=difference,
                maps_identical=difference <= 1e-5,
            )
        )
        mixed = Timing(method, runs[f"{method} mixed"][0], stock_times, runs[f"{method} mixed"][1][method], stock_maps)
        correlation = pearson(mixed.ours_output, stock_maps)
        results.append(
            Result.speedup(
                mixed_target,
                mixed,
                goal=None,
                note=f"{precision} autocast vs stock fp32; {setting}",
                pearson_vs_stock_fp32=correlation,
                pearson_goal_met=correlation >= 0.99,
            )
        )
    stock_times, stock_maps = runs["stock family"]
    family = Timing("family", runs["family"][0], stock_times, runs["family"][1], stock_maps)
    difference = max(float(np.abs(family.ours_output[name] - stock_maps[name]).max()) for name in GRADIENT_FAMILY)
    results.append(
        Result.speedup(
            TARGETS[4],
            family,
            goal=3.0,
            note=f"{', '.join(GRADIENT_FAMILY)}; {setting}, chunk of {len(chunk_targets)}",
            max_abs_diff=difference,
            maps_identical=difference <= 1e-5,
        )
    )
    return results
