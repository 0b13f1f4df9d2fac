"""Mixed precision: the config's precision names, what ``auto`` picks on this machine, and the
autocast context every forward runs under."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``explain.precision`` -> autocast dtype (None: plain float32)."""

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags of CPUs with bf16 arithmetic (AVX512-BF16, AMX): there bf16 autocast
halves the explain stage's time (benchmarks/RESULTS.md); elsewhere it is emulated and slower."""

FP32_ON_CPU = frozenset({"ablationcam"})
"""Methods ``auto`` keeps in float32 on CPUs: AblationCAM's bf16 map has Pearson 0.987 with its
fp32 map (every other method >= 0.99; benchmarks/RESULTS.md), because it ranks channels by small
score differences that bf16's 8-bit mantissa blurs."""

FP32_UNDER_AUTO = frozenset({"xgradcam"})
"""Methods ``auto`` keeps in float32 on every device: XGradCAM divides each channel's
gradient-weighted sum by the channel's activation sum, and at layers whose activations sum to
near zero (EfficientNet-Lite0's ``_conv_head``, before its ReLU6) bf16 rounding moves those
quotients: on the real-photos example its map's energy on the cup fell from 0.69 (fp32) to 0.27,
below a uniform map's 0.44, and on the rocket from 0.076 to 0.027 (tests/test_real_photos.py),
while the other gradient CAMs moved by <= 0.016."""


@functools.cache
def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo does not exist, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    return frozenset(
        flag for line in text.splitlines() if line.startswith("flags") for flag in line.partition(":")[2].split()
    )


def describe_cpu_kernels() -> str:
    """The CPU's precision path, e.g. ``AVX512; bf16: avx512_bf16``: torch's CPU kernel capability
    and the bf16 instructions present. bf16 autocast runs other kernels on AMX than on
    AVX512-BF16, so the same training or explanation differs in its last digits between them."""
    bf16 = [flag for flag in CPU_BF16_FLAGS if flag in cpu_flags()]
    return f"{torch.backends.cpu.get_cpu_capability()}; bf16: {', '.join(bf16) or 'none'}"


def resolve_precision(setting: str, device: torch.device | str) -> str:
    """The precision ``setting`` means on ``device``: itself, or for ``auto`` bf16 where the hardware
    computes in bf16 (a CPU with :data:`CPU_BF16_FLAGS`, a CUDA GPU with bf16 support: Ampere and
    later) and fp32 elsewhere. ``auto`` never picks fp16: without a loss scale the gradient CAMs'
    backward underflows in its 5-bit exponent, and GPUs without bf16 gain little from it for our
    small batches; ask for it explicitly."""
    if setting != "auto":
        return setting
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu":
        return "bf16" if any(flag in cpu_flags() for flag in CPU_BF16_FLAGS) else "fp32"
    return "fp32"


def amp_dtype(setting: str, device: torch.device | str, method: str | None = None) -> torch.dtype | None:
    """The autocast dtype of ``method``'s forwards (None: float32) under ``setting`` on ``device``;
    ``auto`` keeps :data:`FP32_UNDER_AUTO` methods in float32, and :data:`FP32_ON_CPU` ones on CPUs."""
    if setting == "auto" and (
        method in FP32_UNDER_AUTO or (method in FP32_ON_CPU and torch.device(device).type == "cpu")
    ):
        return None
    return PRECISIONS[resolve_precision(setting, device)]


def describe_precision(setting: str, device: torch.device | str, methods: tuple[str, ...] | list[str] = ()) -> str:
    """What a run records and shows: the resolved precision, how it was chosen, and the methods
    that run in another one (``bf16 (auto; ablationcam fp32)``)."""
    resolved = resolve_precision(setting, device)
    kept = sorted(method for method in methods if amp_dtype(setting, device, method) != PRECISIONS[resolved])
    notes = (["auto"] if setting == "auto" else []) + [f"{method} fp32" for method in kept]
    return f"{resolved} ({'; '.join(notes)})" if notes else resolved


def autocast_context(device: torch.device | str, dtype: torch.dtype | None):
    """Autocast on ``device`` with ``dtype`` (bf16/fp16), or a no-op context when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
