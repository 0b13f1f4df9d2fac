"""Where the time of a model-bound benchmark goes: ``python -m benchmarks.profiles [lime|scorecam]``.

Prints the share of wall time spent inside the model's forward (for our side and the stock
side) and torch.profiler's top operators for ours, which is what RESULTS.md quotes when a
speed-up target is missed: if the model's forward is most of both sides, only a faster forward
(layout, batch size, precision, fewer forwards) can move the ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn


class _Clock:
    """Seconds spent in a model's forwards, shared with copies of the model (its inference copy)."""

    seconds = 0.0

    def __deepcopy__(self, memo: dict) -> _Clock:
        return self


class _Timed(nn.Module):
    """Wraps a model and adds up the wall time of its forwards (and of its copies' forwards)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.clock = _Clock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        started = time.perf_counter()
        out = self.model(x)
        self.clock.seconds += time.perf_counter() - started
        return out


def _share(label: str, fn, timed: _Timed) -> None:
    timed.clock.seconds = 0.0
    started = time.perf_counter()
    fn()
    total = time.perf_counter() - started
    seconds = timed.clock.seconds
    print(f"{label}: {total:.2f} s wall, {seconds:.2f} s in the model's forward ({seconds / total:.0%})")


def profile_lime(samples: int = 200) -> None:
    import torchvision

    from benchmarks.bench_lime import MEAN, STD, STOCK_BATCH_SIZE, stock_classifier, stock_lime, test_image
    from xai_audit.tasks.data.models import PixelModel
    from xai_audit.tasks.explain.lime import explain_lime, segment

    torch.manual_seed(0)
    timed = _Timed(torchvision.models.resnet18().eval())
    image = test_image(224)
    segments = segment(image)
    classify = stock_classifier(timed, torch.device("cpu"))
    target = int(np.argmax(classify(image[None])[0]))
    model_fn = PixelModel(timed, MEAN, STD)

    def ours(amp=None):
        return explain_lime(model_fn, [image], [target], num_samples=samples, batch_size=256, amp_dtype=amp)

    def stock():
        stock_lime(image, classify, segments, target, samples, seed=0)

    ours()
    _share(f"stock lime_image, {samples} samples, batch {STOCK_BATCH_SIZE}", stock, timed)
    _share(f"ours fp32, {samples} samples, batch 256", ours, timed)
    _share(f"ours bf16, {samples} samples, batch 256", lambda: ours(torch.bfloat16), timed)
    _top_ops(lambda: ours(torch.bfloat16))


def profile_scorecam(pixels: int = 128) -> None:
    import pytorch_grad_cam as library
    import torchvision
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from xai_audit.tasks.explain.cams import forward_with_cams

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    timed = _Timed(model)
    image = torch.randn(1, 3, pixels, pixels, generator=torch.Generator().manual_seed(1))
    target = int(model(image).argmax())

    def stock():
        with library.ScoreCAM(model=timed, target_layers=[model.layer4[-1]]) as cam:
            cam(input_tensor=image, targets=[ClassifierOutputTarget(target)])

    def ours():
        forward_with_cams(timed, model.layer4[-1], image, [target], ["scorecam"])

    ours()
    _share(f"stock ScoreCAM, {pixels} px", stock, timed)
    _share(f"ours ScoreCAM, {pixels} px", ours, timed)
    _top_ops(ours)


def _top_ops(fn, rows: int = 8) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profiles", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["lime", "scorecam"])
    args = parser.parse_args()
    {"lime": profile_lime, "scorecam": profile_scorecam}[args.what]()


if __name__ == "__main__":
    main()
