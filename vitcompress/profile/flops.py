"""FLOPs as fvcore counts them (one per multiply-add), with the ops fvcore would skip silently.

fvcore traces the model and only counts ops it has a handler for; fused attention
(``aten::scaled_dot_product_attention``), ``baddbmm`` and the scatter-add of token merging are not among them,
so a compressed model would look cheaper than it is. The handlers below fill those gaps.
"""
import math
import warnings
from typing import Any

import torch


def _shape(value):
    from fvcore.nn.jit_handles import get_shape
    return get_shape(value)


def _sdpa_flops(inputs, outputs) -> int:
    q, k, v = (_shape(inputs[i]) for i in range(3))
    *batch, n_q, d = q
    n_k, d_v = k[-2], v[-1]
    return math.prod(batch) * n_q * n_k * (d + d_v)  # q @ k^T and probabilities @ v


def _scatter_add_flops(inputs, outputs) -> int:
    return math.prod(_shape(inputs[3]))  # one addition per merged element


def _baddbmm_flops(inputs, outputs) -> int:
    b, n, m = _shape(inputs[1])
    return b * n * m * _shape(inputs[2])[-1]  # the batched product; fvcore counts no additions


def _native_mha_flops(inputs, outputs) -> int:
    """``nn.MultiheadAttention``'s inference fast path (open_clip towers): in-projections, attention,
    out-projection, counted as the unfused ops would be."""
    (batch, n_q, dim), n_k, n_v = _shape(inputs[0]), _shape(inputs[1])[1], _shape(inputs[2])[1]
    return batch * ((n_q + n_k + n_v) * dim * dim + 2 * n_q * n_k * dim + n_q * dim * dim)


def _convolution_mode_flops(inputs, outputs) -> int:
    """A convolution with a string padding (``padding="valid"``: SigLIP's patch embedding), counted
    as fvcore counts any other: output elements x input channels per group x kernel size."""
    weight = _shape(inputs[1])
    return math.prod(_shape(outputs[0])) * math.prod(weight[1:])


HANDLES = {
    "aten::_convolution_mode": _convolution_mode_flops,
    "aten::_native_multi_head_attention": _native_mha_flops,
    "aten::baddbmm": _baddbmm_flops,
    "aten::scaled_dot_product_attention": _sdpa_flops,
    "aten::scatter_add": _scatter_add_flops,
    "aten::scatter_add_": _scatter_add_flops,
}


def count_flops(model: torch.nn.Module, inputs: Any) -> int:
    """Total multiply-adds of ``model(inputs)`` per fvcore, including fused attention and merging."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore's use of torch.jit
        from fvcore.nn import FlopCountAnalysis

    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # fvcore's use of torch.jit
            analysis = FlopCountAnalysis(model, inputs).set_op_handle(**HANDLES)
            analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            return int(analysis.total())
    finally:
        model.train(was_training)
