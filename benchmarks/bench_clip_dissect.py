"""Target 4: CLIP-Dissect's ``soft_wpmi`` vs a per-unit loop written like the paper's reference code.

The stock side below follows the structure of the reference implementation (Oikarinen & Weng,
``similarity.py``): a softmax over concepts, each unit's top images by ``topk``, then a Python
loop over units that gathers the unit's top rows, forms ``1 + p_r (p(c|x) - 1)`` and sums
``log(. + min_prob)`` over ranks; finally ``log p(c)`` by logsumexp over units. It is written
here, independently of :mod:`xai_audit.tasks.dissect.clip_dissect`, as ground truth. Both sides get the same
image-concept matrix of cosines ``P = I @ Tᵀ`` (random unit-norm features of CLIP's 512
dimensions; the reference's ``utils.get_similarity_from_activations`` passes plain cosines) and
the same activations. "Identical to 1e-4" is judged against the same loop in float64:
``|ours - exact| / max(|exact|, 1)`` (PMI subtracts two large float32 log sums, so the float32
stock loop itself is ~1e-4 off on the reference's cosine inputs; ours, 2e-5 at the tiny size).
"""

from __future__ import annotations

import json
import sys

import torch

from benchmarks.harness import (
    Result,
    Timing,
    device_for,
    interleave,
    module_json,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    timed,
)

TARGETS = ("4 CLIP-Dissect soft_wpmi speed-up", "4 CLIP-Dissect soft_wpmi peak RSS", "4 CLIP image features throughput")

SETTINGS = {
    # the paper's scale: 10,000 probe images x 20,000 concepts x 512 units
    "tiny": dict(images=300, concepts=500, units=16, repeats=1),
    "cpu": dict(images=10_000, concepts=20_000, units=512, repeats=2),
    "gpu": dict(images=10_000, concepts=20_000, units=512, repeats=3),
}
# The probe set's CLIP image features: open_clip model (random weights), images, batch size.
FEATURE_SETTINGS = {
    "tiny": dict(clip="xai-toy-clip", images=16, batch_size=8),
    "cpu": dict(clip="ViT-B-16", images=16, batch_size=8),
    "gpu": dict(clip="ViT-B-16", images=10_000, batch_size=500),
}
EMBEDDING = 512


def reference_soft_wpmi(
    clip_feats: torch.Tensor,
    target_feats: torch.Tensor,
    top_k: int = 100,
    a: float = 10,
    lam: float = 1,
    min_prob: float = 1e-7,
    p_start: float = 0.998,
    p_end: float = 0.97,
) -> torch.Tensor:
    """soft_wpmi as the reference code computes it: one unit at a time."""
    device = clip_feats.device
    with torch.no_grad():
        probs = torch.softmax(a * clip_feats, dim=1)
        top = torch.topk(target_feats, dim=0, k=top_k)[1]
        p_in = p_start - (torch.arange(top_k, device=device) / top_k * (p_start - p_end)).unsqueeze(1)
        per_unit = []
        for unit in range(target_feats.shape[1]):
            rows = probs.gather(0, top[:, unit : unit + 1].expand(-1, probs.shape[1]))
            given_unit = 1 + p_in * (rows - 1)
            per_unit.append(torch.sum(torch.log(given_unit + min_prob), dim=0, keepdim=True))
        log_given_unit = torch.cat(per_unit, dim=0)
        log_concept = torch.logsumexp(log_given_unit, dim=0, keepdim=True) - torch.log(
            log_given_unit.shape[0] * torch.ones([1], device=device)
        )
        return log_given_unit - lam * log_concept


def inputs(images: int, concepts: int, units: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosines ``P = I @ Tᵀ`` of random unit-norm features, and non-negative unit activations."""
    generator = torch.Generator().manual_seed(0)
    image_feats = torch.nn.functional.normalize(torch.randn(images, EMBEDDING, generator=generator), dim=1)
    text_feats = torch.nn.functional.normalize(torch.randn(concepts, EMBEDDING, generator=generator), dim=1)
    activations = torch.randn(images, units, generator=generator).relu_()
    clip_feats = image_feats.to(device) @ text_feats.to(device).T
    return clip_feats, activations.to(device)


def run(size: str) -> list[Result]:
    return similarity_results(size) + [feature_result(size)]


def feature_result(size: str) -> Result:
    """Images per second of :func:`xai_audit.tasks.dissect.clip_dissect.clip_image_features` (reported, no goal)."""
    try:
        import open_clip

        from xai_audit.tasks.dissect.clip_dissect import clip_image_features
        from xai_audit.tasks.world.toy_clip import register_toy_clip
    except ImportError as error:
        return Result.skipped(TARGETS[2], f"missing library: {error}")
    s = FEATURE_SETTINGS[size]
    device = device_for(size)
    register_toy_clip()
    torch.manual_seed(0)
    model = open_clip.create_model(s["clip"], pretrained=None).eval().to(device)
    pixels = model.visual.image_size
    pixels = pixels[0] if isinstance(pixels, (tuple, list)) else pixels
    batch = torch.randn(s["batch_size"], 3, pixels, pixels, generator=torch.Generator().manual_seed(0))
    batches = [batch] * (s["images"] // s["batch_size"])
    clip_image_features(model, None, batches[:1], device)  # warm-up
    seconds, feats = timed(lambda: clip_image_features(model, None, batches, device))
    return Result(
        TARGETS[2],
        round(len(feats) / seconds, 1),
        None,
        unit="img/s",
        note=f"{s['clip']} random weights, {pixels} px, {len(feats):,} images, batch {s['batch_size']}, fp32",
        extra={"seconds": round(seconds, 3)},
    )


def similarity_results(size: str) -> list[Result]:
    """Targets 4's speed-up and peak RSS of soft_wpmi against the per-unit reference loop."""
    from xai_audit.tasks.dissect.clip_dissect import soft_wpmi

    s = SETTINGS[size]
    device = device_for(size)
    clip_feats, target_feats = inputs(s["images"], s["concepts"], s["units"], device)
    scale = f"{s['images']:,} images x {s['concepts']:,} concepts x {s['units']} units on {device.type}"

    # Peak memory of ours alone (inputs already resident): the high-water mark is restarted at
    # the start of each of our calls and read at its end.
    resident = rss_mib()
    peaks: list[float] = []
    fresh_peak = True

    cuda_peaks: list[float] = []

    def ours():
        nonlocal fresh_peak
        fresh_peak = reset_peak_rss() and fresh_peak
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        output = soft_wpmi(clip_feats, target_feats)
        peaks.append(peak_rss_mib())
        if device.type == "cuda":
            cuda_peaks.append(torch.cuda.max_memory_allocated() / 2**20)
        return output

    small = slice(0, min(8, s["units"]))
    soft_wpmi(clip_feats, target_feats[:, small])  # warm both paths on a few units
    reference_soft_wpmi(clip_feats, target_feats[:, small])
    runs = interleave(
        {"ours": ours, "stock": lambda: reference_soft_wpmi(clip_feats, target_feats).float().cpu()},
        repeats=s["repeats"],
        warmup=0,
    )
    timing = Timing("soft_wpmi", runs["ours"][0], runs["stock"][0], runs["ours"][1], runs["stock"][1])
    difference = (timing.ours_output - timing.stock_output).abs()
    relative = difference / timing.stock_output.abs().clamp_min(1.0)
    # Both sides are float32; PMI subtracts two large log sums, so either can be ~1e-4 off. The
    # reference loop in float64 (untimed) is the ground truth that "identical" is judged against.
    exact = reference_soft_wpmi(clip_feats.double(), target_feats.double()).cpu()

    def error(output: torch.Tensor) -> float:
        return float(((output.double() - exact).abs() / exact.abs().clamp_min(1.0)).max())

    extra = {
        "max_abs_diff": float(difference.max()),
        "max_rel_diff": float(relative.max()),
        "max_rel_err_vs_float64": error(timing.ours_output),
        "stock_max_rel_err_vs_float64": error(timing.stock_output),
        "identical_1e-4": error(timing.ours_output) <= 1e-4,
        "same_top_concept": float((timing.ours_output.argmax(1) == timing.stock_output.argmax(1)).float().mean()),
    }
    memory = {
        "process_rss_before_mib": round(resident),
        "process_peak_rss_mib": round(max(peaks)),
        "peak_reset": fresh_peak,
        "inputs_mib": round((clip_feats.numel() + target_feats.numel()) * 4 / 2**20),
    }
    if device.type == "cuda":  # the work (and its memory) is on the GPU; host RSS is libraries and CUDA context
        peak, what = max(cuda_peaks), "CUDA peak allocated during one soft_wpmi call (inputs resident)"
    else:  # this process also holds what earlier benchmarks left behind: measure a process of its own
        alone = fresh_process_peak(size)
        memory["fresh_process"] = alone
        peak, what = (
            alone["peak_rss_mib"],
            "peak RSS (VmHWM) of a fresh process that builds the inputs and calls soft_wpmi once",
        )
    return [
        Result.speedup(TARGETS[0], timing, goal=2.0, note=scale, **extra),
        Result(TARGETS[1], round(peak / 1024, 3), 3.0, "max", "GiB", note=f"{what}; {scale}", extra=memory),
    ]


def fresh_process_peak(size: str) -> dict[str, float]:
    """VmHWM of ``python -m benchmarks.bench_clip_dissect SIZE``: interpreter, torch, inputs, one soft_wpmi call."""
    return module_json("benchmarks.bench_clip_dissect", size)


def _measure_alone(size: str) -> None:
    from xai_audit.tasks.dissect.clip_dissect import soft_wpmi

    s = SETTINGS[size]
    clip_feats, target_feats = inputs(s["images"], s["concepts"], s["units"], torch.device("cpu"))
    before = rss_mib()
    soft_wpmi(clip_feats, target_feats)
    print(json.dumps({"rss_before_call_mib": round(before), "peak_rss_mib": round(peak_rss_mib())}))


if __name__ == "__main__":
    _measure_alone(sys.argv[1])
