"""stages.awq_speedups against AutoAWQ 0.2.9's own code: packing bit-identical, the clip search near-identical."""

from __future__ import annotations

import pytest
import torch

from stages import awq_speedups

awq = pytest.importorskip("awq")
pytestmark = pytest.mark.skipif(awq.__version__ != awq_speedups.PATCHED_VERSION, reason="written for AutoAWQ 0.2.9")

from awq.modules.linear.gemm import WQLinear_GEMM  # noqa: E402
from awq.quantize.quantizer import AwqQuantizer  # noqa: E402

ORIGINAL_FROM_LINEAR = WQLinear_GEMM.from_linear.__func__
ORIGINAL_BEST_CLIP = AwqQuantizer._compute_best_clip


def quantizer(group_size: int = 32) -> AwqQuantizer:
    q = AwqQuantizer.__new__(AwqQuantizer)  # only what the clip search and pseudo-quantization read
    q.group_size, q.zero_point, q.w_bit = group_size, True, 4
    return q


@pytest.mark.parametrize(("out_features", "in_features", "group_size"), [(64, 128, 32), (96, 256, 128)])
def test_packing_is_bit_identical_to_autoawqs_loop(out_features, in_features, group_size):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=True)
    weight, scales, zeros = quantizer(group_size).pseudo_quantize_tensor(linear.weight.data)
    linear.weight.data = weight
    scales, zeros = scales.t().contiguous(), zeros.t().contiguous()  # as AutoAWQ's _apply_quant hands them over
    theirs = ORIGINAL_FROM_LINEAR(WQLinear_GEMM, linear, 4, group_size, False, scales, zeros)
    ours = awq_speedups.from_linear(WQLinear_GEMM, linear, 4, group_size, False, scales, zeros)
    for name in ("qweight", "qzeros", "scales", "bias"):
        assert torch.equal(getattr(theirs, name), getattr(ours, name)), name


def test_the_batched_clip_search_picks_the_same_clips_and_no_worse_error():
    torch.manual_seed(0)
    q = quantizer(32)
    w = torch.randn(128, 256) * torch.rand(1, 256) * 3  # uneven input channels, as real weights have
    x = torch.randn(4, 300, 256) * torch.rand(256)
    theirs = ORIGINAL_BEST_CLIP(q, w.clone(), x.clone())
    ours = awq_speedups.compute_best_clip(q, w.clone(), x.clone())
    assert ours.shape == theirs.shape
    same = torch.isclose(ours, theirs, rtol=1e-5).float().mean().item()
    assert same >= 0.97, f"only {same:.1%} of the clip values agree"

    def error(max_val: torch.Tensor) -> float:
        groups = w.reshape(128, -1, 32)
        clipped = torch.clamp(groups, -max_val, max_val).reshape(128, 256)
        quantized = q.pseudo_quantize_tensor(clipped)[0]
        flat = x.reshape(-1, 256)
        return ((flat @ quantized.t() - flat @ w.t()) ** 2).mean().item()

    assert error(ours) <= error(theirs) * 1.01


def test_apply_installs_both_only_on_the_version_it_copies(monkeypatch):
    monkeypatch.setattr(WQLinear_GEMM, "from_linear", WQLinear_GEMM.from_linear)
    monkeypatch.setattr(AwqQuantizer, "_compute_best_clip", AwqQuantizer._compute_best_clip)
    assert awq_speedups.apply()
    assert AwqQuantizer._compute_best_clip is awq_speedups.compute_best_clip
    monkeypatch.setattr(awq, "__version__", "0.3.0")
    monkeypatch.setattr(AwqQuantizer, "_compute_best_clip", ORIGINAL_BEST_CLIP)
    assert not awq_speedups.apply()
    assert AwqQuantizer._compute_best_clip is ORIGINAL_BEST_CLIP
