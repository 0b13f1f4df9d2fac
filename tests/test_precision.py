"""``explain.precision: auto`` follows the hardware: bf16 where the CPU has AVX512-BF16/AMX or the
GPU supports bf16, fp32 elsewhere, and AblationCAM in fp32 on CPUs (detection mocked)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xai_audit.tasks.compute import precision
from xai_audit.tasks.compute.precision import amp_dtype, cpu_flags, describe_precision, resolve_precision
from xai_audit.tasks.core.config import ExplainConfig
from xai_audit.tasks.explain.base import ExplainContext
from xai_audit.tasks.explain.cams import CamFamily, compute_cams

EPYC_FLAGS = "fpu vme avx2 avx512f avx512bw avx512_bf16 avx512_vnni"  # this machine's, abridged
OLD_FLAGS = "fpu vme sse4_2 avx avx2 fma"  # a Haswell-era CPU: no bf16 arithmetic


def _with_flags(monkeypatch, flags: str) -> None:
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags.split()))


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {EPYC_FLAGS}\n\nprocessor\t: 1\nflags\t\t: {EPYC_FLAGS}\n")
    assert cpu_flags(cpuinfo) == frozenset(EPYC_FLAGS.split())
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(EPYC_FLAGS, "bf16"), ("fpu avx512f amx_tile amx_bf16 amx_int8", "bf16"), (OLD_FLAGS, "fp32"), ("", "fp32")],
    ids=["avx512_bf16", "amx", "avx2-only", "unknown"],
)
def test_auto_on_a_cpu_follows_its_bf16_flags(monkeypatch, flags, expected):
    _with_flags(monkeypatch, flags)
    assert resolve_precision("auto", "cpu") == expected
    assert amp_dtype("auto", "cpu") == {"bf16": torch.bfloat16, "fp32": None}[expected]
    assert resolve_precision("fp16", "cpu") == "fp16"  # an explicit choice is kept


@pytest.mark.parametrize(("supported", "expected"), [(True, torch.bfloat16), (False, None)])
def test_auto_on_a_gpu_follows_its_bf16_support(monkeypatch, supported, expected):
    _with_flags(monkeypatch, "")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: supported)
    assert amp_dtype("auto", "cuda") is expected
    assert amp_dtype("auto", "cuda", "ablationcam") is expected  # fp32 is forced on CPUs only
    assert amp_dtype("auto", "cuda", "xgradcam") is None  # ... and XGradCAM's everywhere
    assert amp_dtype("auto", "mps") is None


def test_auto_keeps_ablationcam_in_fp32_on_a_bf16_cpu_and_says_so(monkeypatch):
    _with_flags(monkeypatch, EPYC_FLAGS)
    assert amp_dtype("auto", "cpu", "ablationcam") is None
    assert amp_dtype("auto", "cpu", "scorecam") is torch.bfloat16
    assert amp_dtype("bf16", "cpu", "ablationcam") is torch.bfloat16  # an explicit bf16 is the user's call
    methods = ["gradcam", "ablationcam"]
    assert describe_precision("auto", "cpu", methods) == "bf16 (auto; ablationcam fp32)"
    assert describe_precision("bf16", "cpu", methods) == "bf16"
    _with_flags(monkeypatch, OLD_FLAGS)
    assert describe_precision("auto", "cpu", methods) == "fp32 (auto)"


def test_auto_keeps_xgradcam_in_fp32_on_a_bf16_cpu_and_says_so(monkeypatch):
    _with_flags(monkeypatch, EPYC_FLAGS)
    assert amp_dtype("auto", "cpu", "xgradcam") is None
    assert amp_dtype("bf16", "cpu", "xgradcam") is torch.bfloat16  # an explicit bf16 is the user's call
    methods = ["gradcam", "xgradcam", "ablationcam"]
    assert describe_precision("auto", "cpu", methods) == "bf16 (auto; ablationcam fp32; xgradcam fp32)"


def test_the_cam_family_under_auto_computes_ablationcam_in_fp32_and_the_rest_in_bf16(monkeypatch):
    """On a (mocked) bf16 CPU, the family's AblationCAM map is the fp32 map exactly, its Grad-CAM the bf16 one."""
    _with_flags(monkeypatch, EPYC_FLAGS)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(16, 3),
    ).eval()
    layer = model[3]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = [0, 1]
    methods = ["gradcam", "ablationcam"]
    settings = ExplainConfig(methods=methods, precision="auto")
    loaded = type("Loaded", (), {"module": model})()
    context = ExplainContext(loaded, layer, settings, 0, amp_dtype("auto", "cpu"), ["a", "b"])
    ours = CamFamily().explain(context, images, targets, methods).maps
    fp32 = compute_cams(model, layer, images, targets, methods, amp_dtype=None)
    bf16 = compute_cams(model, layer, images, targets, methods, amp_dtype=torch.bfloat16)
    np.testing.assert_array_equal(ours["ablationcam"], fp32["ablationcam"])
    np.testing.assert_array_equal(ours["gradcam"], bf16["gradcam"])
    for method in methods:  # the two precisions give different maps here, so the equalities above tell them apart
        assert not np.array_equal(bf16[method], fp32[method]), method


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(EPYC_FLAGS, "bf16: avx512_bf16"), ("avx512f avx512_bf16 amx_bf16 amx_tile", "bf16: avx512_bf16, amx_bf16")],
)
def test_cpu_kernels_name_torchs_capability_and_the_bf16_instructions(monkeypatch, flags, expected):
    _with_flags(monkeypatch, flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert precision.describe_cpu_kernels() == f"AVX512; {expected}"
    _with_flags(monkeypatch, OLD_FLAGS)
    assert precision.describe_cpu_kernels() == "AVX512; bf16: none"
