"""Three faster replacements inside AutoAWQ 0.2.9, the library Olive's AWQ pass drives (quantize --algorithm awq).

At the Phi-3.5-mini shapes on one H200, AutoAWQ spent 86 s packing weights (``WQLinear_GEMM.from_linear`` loops
over every input column, then every packed column, one small GPU kernel at a time), 101 s in the clip search
(``AwqQuantizer._compute_best_clip`` multiplies and sums a [256, 512, in] tensor elementwise, in batches of 256
output channels) and about 20 s restoring weights in the scale search (``_compute_best_scale`` keeps its copy of
the block's weights in host memory and copies it back to the GPU after each of its 20 candidates). They are
rewritten here without changing what they compute:

- ``pack_gemm``: the same rounding and the same bit layout, as whole-tensor operations: bit-identical output
  (tests/test_awq_speedups.py checks it against AutoAWQ's own loop).
- ``compute_best_clip``: each group's output as one batched matrix product instead of an elementwise product and
  a sum. The arithmetic is the same up to summation order, so a clip value can differ where two candidates' errors
  tie to within rounding; the test bounds how often and that the clipped weights' error does not grow.
- ``compute_best_scale``: AutoAWQ's own code with the copy of the weights kept where they are (a device-to-device
  copy of one block, at most a few hundred MB): the same scales, bit for bit.

``apply()`` installs them only on the version they were written against; any other version runs unchanged.
"""

from __future__ import annotations

import logging

log = logging.getLogger("olivepress")

PATCHED_VERSION = "0.2.9"
# AutoAWQ's GEMM layout packs 8 4-bit values into an int32 in this order.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_int4(values):  # noqa: ANN001, ANN201 (torch tensors; torch is imported by the caller)
    """[rows, cols] int32 in 0..15 -> [rows, cols / 8] int32, AutoAWQ's GEMM order."""
    import torch

    rows, cols = values.shape
    grouped = values.reshape(rows, cols // 8, 8)[:, :, list(AWQ_ORDER)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=values.device)
    packed = torch.zeros((rows, cols // 8), dtype=torch.int32, device=values.device)
    for i in range(8):  # OR, not sum: int32 overflow in a sum is undefined on some devices
        packed |= grouped[:, :, i] << shifts[i]
    return packed


def from_linear(cls, linear, w_bit, group_size, init_only=False, scales=None, zeros=None):  # noqa: ANN001, ANN201
    """``WQLinear_GEMM.from_linear`` of AutoAWQ 0.2.9, with its two packing loops as tensor operations."""
    import torch
    from awq.utils.utils import get_best_device

    awq_linear = cls(w_bit, group_size, linear.in_features, linear.out_features, linear.bias is not None,
                     linear.weight.device)  # fmt: skip
    if init_only:
        return awq_linear
    assert scales is not None and zeros is not None
    if w_bit != 4:
        raise NotImplementedError("Only 4-bit are supported for now.")
    scale_zeros = zeros * scales
    awq_linear.scales = scales.clone().half()
    if linear.bias is not None:
        awq_linear.bias = linear.bias.clone().half()
    # Row i of the [in, out] integer weight is AutoAWQ's column idx=i: (w[:, i] + sz[i // g]) / s[i // g], rounded.
    per_row_zero = scale_zeros.repeat_interleave(group_size, dim=0)
    per_row_scale = awq_linear.scales.repeat_interleave(group_size, dim=0)
    intweight = torch.round((linear.weight.data.t() + per_row_zero) / per_row_scale).to(torch.int32)
    best_device = get_best_device()
    if "mps" in best_device:
        intweight = intweight.to("cpu")
    awq_linear.qweight = pack_int4(intweight.contiguous())
    zeros = zeros.to(dtype=torch.int32, device=best_device)
    if "mps" in best_device:
        zeros = zeros.to("cpu")
    awq_linear.qzeros = pack_int4(zeros.contiguous())
    return awq_linear


def compute_best_clip(self, w, input_feat, n_grid=20, max_shrink=0.5, n_sample_token=512):  # noqa: ANN001, ANN201
    """``AwqQuantizer._compute_best_clip`` of AutoAWQ 0.2.9, each group's output as a batched matmul."""
    import torch

    assert w.dim() == 2
    out_channels, in_channels = w.shape
    group_size = self.group_size if self.group_size > 0 else in_channels
    groups = in_channels // group_size
    x = input_feat.view(-1, input_feat.shape[-1])
    step = max(1, x.shape[0] // n_sample_token)
    # [groups, tokens, group_size] against [groups, group_size, out]: out[g, t, c] = sum_k x[g, t, k] * w[g, k, c].
    x = x[::step].to(w.device).reshape(-1, groups, group_size).transpose(0, 1)
    w_groups = w.reshape(out_channels, groups, group_size)  # [co, g, k]
    org_out = torch.bmm(x, w_groups.permute(1, 2, 0))
    org_max_val = w_groups.abs().amax(dim=-1, keepdim=True)  # [co, g, 1]
    best_max_val = org_max_val.clone()
    min_errs = torch.full_like(org_max_val, 1e9)
    for i_s in range(int(max_shrink * n_grid)):
        max_val = org_max_val * (1 - i_s / n_grid)
        q_w = self.pseudo_quantize_tensor(torch.clamp(w_groups, -max_val, max_val))[0]
        cur_out = torch.bmm(x, q_w.reshape(out_channels, groups, group_size).permute(1, 2, 0))
        err = (cur_out - org_out).pow(2).mean(dim=1).transpose(0, 1).unsqueeze(-1)  # [co, g, 1]
        better = err < min_errs
        min_errs[better] = err[better]
        best_max_val[better] = max_val[better]
    return best_max_val  # [co, g, 1], what AutoAWQ returns after its squeeze(1)


def compute_best_scale(self, x, w_mean, x_mean, module2inspect, linears2scale, fp16_output, kwargs={}):  # noqa: ANN001, ANN201, B006
    """``AwqQuantizer._compute_best_scale`` of AutoAWQ 0.2.9; only ``org_sd`` differs (a clone, not a host copy)."""
    import torch

    n_grid = 20
    history = []
    best_ratio = -1
    best_scales = None
    best_error = float("inf")

    org_sd = {k: v.clone() for k, v in module2inspect.state_dict().items()}

    device = x.device
    x_mean = x_mean.view(-1).to(device)
    w_mean = w_mean.view(-1).to(device)

    for ratio in range(n_grid):
        ratio = ratio / n_grid
        if self.duo_scaling:
            scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        else:
            scales = x_mean.pow(ratio).clamp(min=1e-4).view(-1)
        scales = scales / (scales.max() * scales.min()).sqrt()
        scales_view = scales.view(1, -1).to(device)
        scales[torch.isinf(scales)] = 1
        scales[torch.isnan(scales)] = 1
        for fc in linears2scale:
            fc.weight.mul_(scales_view)
            fc.weight.data = self.pseudo_quantize_tensor(fc.weight.data)[0] / scales_view
        int_w_output = self._module_forward(x, module2inspect, kwargs)
        int_w_output = int_w_output.clip(torch.finfo(int_w_output.dtype).min, torch.finfo(int_w_output.dtype).max)
        loss = self._compute_loss(fp16_output, int_w_output, device)
        history.append(loss)
        if loss < best_error:
            best_error = loss
            best_ratio = ratio
            best_scales = scales.clone()
        module2inspect.load_state_dict(org_sd)

    if best_ratio == -1:
        log.debug(history)
        raise Exception
    assert torch.isnan(best_scales).sum() == 0, best_scales
    return best_scales.detach().cpu()


def apply() -> bool:
    """Install the three replacements if the installed AutoAWQ is the version they copy; say so either way."""
    import awq
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.quantize.quantizer import AwqQuantizer

    if awq.__version__ != PATCHED_VERSION:
        log.warning("AutoAWQ %s: its own (slower) packing, clip search and scale search run", awq.__version__)
        return False
    WQLinear_GEMM.from_linear = classmethod(from_linear)
    AwqQuantizer._compute_best_clip = compute_best_clip
    AwqQuantizer._compute_best_scale = compute_best_scale
    log.info("AutoAWQ %s: vectorized packing, batched clip search, scale search without host copies installed",
             awq.__version__)  # fmt: skip
    return True
