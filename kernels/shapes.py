"""Sizes and layouts of the core op's tensors: one source for the launchers, the reference and
the fake (shape-only) implementations that ``torch.compile`` traces, so they cannot drift apart.

Imports only torch (no triton), so the pure-PyTorch path can use it without loading Triton.
"""
import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout outputs take: channels_last when x is (only) channels_last, as conv2d does."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def saved_c_format(x: torch.Tensor, backend: str) -> torch.memory_format:
    """The layout of the forward's saved ``c``: channels_last on the triton backend for either
    input layout, which is the order of the backward's GEMM operand ``grad_d [N, OH, OW, O]``,
    so the backward can write grad_d into c's memory (see ``bwd.scd2d_bwd``); the output's
    layout on the reference backend."""
    return torch.channels_last if backend == "triton" else memory_format(x)


def output_hw(x_hw, kernel_hw, stride, padding, dilation):
    """Output height and width of a convolution with (top, bottom, left, right) padding."""
    pads = (padding[0] + padding[1], padding[2] + padding[3])
    return tuple((size + pad - dil * (k - 1) - 1) // s + 1
                 for size, k, s, pad, dil in zip(x_hw, kernel_hw, stride, pads, dilation))
