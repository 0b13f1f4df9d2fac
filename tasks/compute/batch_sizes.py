"""Images per forward for the perturbation forwards (LIME, ScoreCAM, deletion/insertion) under ``auto``.

These forwards run the model's inference copy (:mod:`xai_audit.tasks.compute.inference`) on many images whose
activations nobody reads, so the batch size only trades speed. On CPUs cache-sized batches win.
Measured on 2 cores (ResNet18, packed inference copy, 128 and 224 px, alternating rounds): in
float32, 16 runs fastest (32 is 3-8 % slower, 64 10-13 %); under bf16 autocast 16 and 32 tie on
whole forwards and 32 is ~5 % faster in ScoreCAM at 128 px. GPUs want large batches; each caller
names the one measured for it (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch

CPU_BATCH_SIZES = {"fp32": 16, "mixed": 32}
"""CPU images per forward in float32 and under a lower-precision autocast."""


def perturbation_batch_size(device: torch.device | str, amp_dtype: torch.dtype | None, *, accelerator: int) -> int:
    """:data:`CPU_BATCH_SIZES` on CPUs (by precision), ``accelerator`` on any other device."""
    if torch.device(device).type != "cpu":
        return accelerator
    return CPU_BATCH_SIZES["fp32" if amp_dtype in (None, torch.float32) else "mixed"]


def configured_batch_size(setting: int | str) -> int | None:
    """A configured batch size, None for ``auto`` (the method then picks one by device and precision)."""
    return None if setting == "auto" else int(setting)
