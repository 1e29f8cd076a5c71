"""stages.awq_speedups against AutoAWQ 0.2.9's own code: packing and the scale search bit-identical, the clip search
near-identical."""

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
ORIGINAL_BEST_SCALE = AwqQuantizer._compute_best_scale


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


def test_the_scale_search_without_host_copies_picks_bit_identical_scales(monkeypatch):
    torch.manual_seed(0)
    q = quantizer(32)
    q.duo_scaling, q.max_chunk_memory, q.n_parallel_calib_samples = True, 1 << 20, None
    block = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, 64))
    x = torch.randn(2, 40, 64) * torch.rand(64) * 4
    with torch.no_grad():
        reference = block(x)
    w_mean, x_mean = block[0].weight.abs().mean(0), x.abs().view(-1, 64).mean(0)
    with torch.no_grad():  # as AutoAWQ's _search_best_scale calls it
        ours = awq_speedups.compute_best_scale(q, x, w_mean, x_mean, block, [block[0]], reference)
    ours_weights = {name: tensor.clone() for name, tensor in block.state_dict().items()}
    # On a GPU, AutoAWQ's .cpu() copies the weights to the host; on a CPU it would alias them. Give the original
    # the copy it makes on a GPU, so both run what they run there.
    monkeypatch.setattr(torch.Tensor, "cpu", lambda tensor: tensor.clone())
    with torch.no_grad():
        theirs = ORIGINAL_BEST_SCALE(q, x, w_mean, x_mean, block, [block[0]], reference)
    assert torch.equal(ours, theirs)
    for name, tensor in block.state_dict().items():  # both leave the block's weights as they found them
        assert torch.equal(tensor, ours_weights[name]), name


def test_apply_installs_the_replacements_only_on_the_version_they_copy(monkeypatch):
    monkeypatch.setattr(WQLinear_GEMM, "from_linear", WQLinear_GEMM.from_linear)
    monkeypatch.setattr(AwqQuantizer, "_compute_best_clip", AwqQuantizer._compute_best_clip)
    monkeypatch.setattr(AwqQuantizer, "_compute_best_scale", AwqQuantizer._compute_best_scale)
    assert awq_speedups.apply()
    assert AwqQuantizer._compute_best_clip is awq_speedups.compute_best_clip
    assert AwqQuantizer._compute_best_scale is awq_speedups.compute_best_scale
    monkeypatch.setattr(awq, "__version__", "0.3.0")
    monkeypatch.setattr(AwqQuantizer, "_compute_best_clip", ORIGINAL_BEST_CLIP)
    assert not awq_speedups.apply()
    assert AwqQuantizer._compute_best_clip is ORIGINAL_BEST_CLIP
