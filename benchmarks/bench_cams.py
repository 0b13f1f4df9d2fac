"""Targets 2 and 3: our CAMs vs the grad-cam package called the way the seed study called it.

Stock side: one grad-cam object per method (``ScoreCAM(model, target_layers=[layer])`` etc.,
default inner batch sizes), called on the image batch with ``ClassifierOutputTarget`` targets;
each object is created and released inside the timed call, so its hooks never touch the other
side's forwards. Ours: :func:`xai_audit.tasks.explain.cams.forward_with_cams` with the pipeline's defaults, which
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
    "2 ScoreCAM channel budget vs full ScoreCAM",
    "2 Group-CAM vs stock ScoreCAM",
    "2 Group-CAM deletion AUC margin over ScoreCAM (positive: Group-CAM deletes faster)",
)

BUDGET_CHANNELS = 64
"""K of ``explain.scorecam_channels`` the budget row measures (of ResNet18 layer4's 512 channels)."""

PAPER_GROUPCAM = (
    "paper (Zhang et al. 2021, arXiv:2103.13859, Table 1, ImageNet val, VGG19): Group-CAM's deletion "
    "and insertion better than Grad-CAM's and Score-CAM's by about 0.01 AUC each; the table's exact "
    "numbers could not be read from this machine (no network), so the margin is stated, not quoted"
)

GRADIENT_FAMILY = ("gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")

SETTINGS = {
    # perturbation CAMs: images per call; gradient family: images per chunk. cpu uses 128 px:
    # stock ScoreCAM needs 512 full forwards per image (~3.5 min at 224 px on a loaded 2-core box).
    "tiny": dict(arch="resnet18", pixels=64, perturbation_images=1, chunk=2, repeats=1),
    "cpu": dict(arch="resnet18", pixels=128, perturbation_images=1, chunk=8, repeats=3),
    "gpu": dict(arch="resnet50", pixels=224, perturbation_images=2, chunk=32, repeats=3),
}
TRAINED = {
    # budget and Group-CAM quality rows: the trained demo ResNet18 on world val images (128 px);
    # tiny: a random ResNet18 on noise (seconds; agreement there means nothing)
    "tiny": dict(images=1, repeats=1, trained=False),
    "cpu": dict(images=2, repeats=1, trained=True),
    "gpu": dict(images=16, repeats=3, trained=True),
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

    from xai_audit.tasks.explain.cams import forward_with_cams

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
    forward_with_cams(model, layer, small, chunk_targets[:1], ["scorecam", "ablationcam", "groupcam", *GRADIENT_FAMILY])
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
            "groupcam": ours(["groupcam"], images, targets),
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
    stock_times, _ = runs["stock scorecam"]
    group = Timing("groupcam", runs["groupcam"][0], stock_times, runs["groupcam"][1]["groupcam"])
    results.append(
        Result.speedup(
            TARGETS[6], group, goal=10.0, note=f"{setting}, {len(targets)} image(s); Group-CAM's default 32 groups"
        )
    )
    return results + trained_rows(size, device)


def trained_rows(size: str, device: torch.device) -> list[Result]:
    """Channel budget vs full ScoreCAM (speed, Spearman) and Group-CAM's deletion/insertion, on a trained model."""
    from xai_audit.tasks.core.config import MetricsConfig
    from xai_audit.tasks.explain.cams import forward_with_cams
    from xai_audit.tasks.metrics.maps import deletion_insertion, spearman

    t = TRAINED[size]
    if t["trained"]:
        from xai_audit.tasks.world.demo_model import ensure_demo_model, load_demo_model, load_images, normalize
        from xai_audit.tasks.world.synthetic import ensure_world

        model = load_demo_model(ensure_demo_model())[0].to(device)
        images = normalize(load_images(ensure_world(), "val")[0][: t["images"]]).to(device)
        setting = f"demo ResNet18 (trained), layer4, {t['images']} world val image(s), 128 px"
    else:
        import torchvision

        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=10).eval().to(device)
        images = torch.randn(t["images"], 3, 64, 64, generator=torch.Generator().manual_seed(2)).to(device)
        setting = "random ResNet18 on noise (tiny: a smoke run, agreement meaningless), 64 px"
    layer = model.layer4[-1]
    with torch.no_grad():
        targets = model(images).argmax(dim=-1).tolist()

    def maps(methods, **options):
        return lambda: forward_with_cams(model, layer, images, targets, methods, **options)[1]

    runs = interleave(
        {
            "scorecam": maps(["scorecam"]),
            "budget": maps(["scorecam"], scorecam_channels=BUDGET_CHANNELS),
            "groupcam": maps(["groupcam"]),
            "gradcam": maps(["gradcam"]),
        },
        repeats=t["repeats"],
        warmup=0,
    )
    full, budget = runs["scorecam"][1]["scorecam"], runs["budget"][1]["scorecam"]
    correlations = [spearman(a, b) for a, b in zip(full, budget)]
    timing = Timing("budget", runs["budget"][0], runs["scorecam"][0], budget, full)
    mean_spearman = float(np.nanmean(correlations))
    results = [
        Result.speedup(
            TARGETS[5],
            timing,
            goal=4.0,
            note=f"K = {BUDGET_CHANNELS} of 512 channels vs full ScoreCAM (both ours, fp32); {setting}",
            channels=BUDGET_CHANNELS,
            spearman_per_image=[round(c, 4) for c in correlations],
            spearman_mean=round(mean_spearman, 4),
            spearman_goal_met=bool(mean_spearman >= 0.95),
        )
    ]
    settings = MetricsConfig()
    scores = {}
    for method in ("groupcam", "scorecam", "gradcam"):
        deletion, insertion = deletion_insertion(
            model, images, runs[method][1][method], targets, steps=settings.steps, baseline=settings.baseline
        )
        scores[method] = (float(deletion.mean()), float(insertion.mean()))
    group_time = float(np.median(runs["groupcam"][0]))
    results.append(
        Result(
            TARGETS[7],
            round(scores["scorecam"][0] - scores["groupcam"][0], 4),
            None,
            "min",
            " AUC",
            note=(
                f"mean deletion/insertion AUC (xai_audit.tasks.metrics.maps, {settings.steps} steps, "
                f"{settings.baseline} baseline): "
                + ", ".join(f"{m} {d:.3f}/{i:.3f}" for m, (d, i) in scores.items())
                + f"; {setting}; {PAPER_GROUPCAM}"
            ),
            extra={
                **{f"{m}_deletion_auc": round(d, 4) for m, (d, _) in scores.items()},
                **{f"{m}_insertion_auc": round(i, 4) for m, (_, i) in scores.items()},
                "groupcam_vs_scorecam_speedup": round(float(np.median(runs["scorecam"][0])) / group_time, 2),
            },
        )
    )
    return results
