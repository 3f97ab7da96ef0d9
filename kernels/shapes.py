"""Sizes and layouts of the core op's tensors: one source for the launchers, the reference and
the fake (shape-only) implementations that ``torch.compile`` traces, so they cannot drift apart.

Imports only torch (no triton), so the pure-PyTorch path can use it without loading Triton.
"""
import functools

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


def uses_direct_kernel(groups, in_per_group, out_per_group):
    """Grouped layers with at most 4 input and 4 output channels per group (depthwise-like)."""
    return groups > 1 and in_per_group <= 4 and out_per_group <= 4


def saved_norm_format(x_format: torch.memory_format, weight_shape, groups: int,
                      backend: str) -> torch.memory_format:
    """The layout of the forward's saved norms ``[N, G, OH, OW]`` (float32, one per group and
    position) for an x of layout ``x_format`` (``memory_format``): channels_last (groups
    innermost) on the triton backend for a channels_last x of a depthwise-like layer, whose
    direct kernels and backward prologue run along groups (there the norms are output-sized
    and go 16 bytes at a time, not 4 bytes a plane apart); else positions innermost."""
    if (backend == "triton" and x_format == torch.channels_last
            and uses_direct_kernel(groups, weight_shape[1], weight_shape[0] // groups)):
        return torch.channels_last
    return torch.contiguous_format


def output_hw(x_hw, kernel_hw, stride, padding, dilation):
    """Output height and width of a convolution with (top, bottom, left, right) padding."""
    pads = (padding[0] + padding[1], padding[2] + padding[3])
    return tuple((size + pad - dil * (k - 1) - 1) // s + 1
                 for size, k, s, pad, dil in zip(x_hw, kernel_hw, stride, pads, dilation))


def tap_reads(size, out_size, kernel, stride, pad, dil):
    """Per kernel tap along one input dimension of ``size`` (``pad`` leading), the slice of
    indices in ``[0, size)`` that it reads for the ``out_size`` outputs; None where it reads
    none."""
    reads = []
    for r in range(kernel):
        start = r * dil - pad                             # what output 0 reads, maybe < 0
        first = max(0, -(start // stride))               # the first output reading index >= 0
        last = min(out_size - 1, (size - 1 - start) // stride)
        reads.append(slice(start + first * stride, start + last * stride + 1, stride)
                     if first <= last else None)
    return reads


@functools.lru_cache(maxsize=1024)
def every_input_read(hw, out_hw, kernel_hw, stride, padding, dilation) -> bool:
    """Whether every input pixel lies in some patch ((top, bottom, left, right) ``padding``).
    Not so where the stride skips pixels (1×1 at stride 2), a dilation's gap spans more rows
    than the outputs, or the last rows or columns fall past the last patch: their gradient is
    0 whatever x holds there, NaN and Inf too, which the backward must not turn into x·0."""
    for size, out, k, s, pad, d in zip(hw, out_hw, kernel_hw, stride, padding[::2], dilation):
        read = bytearray(size)
        for taps in tap_reads(size, out, k, s, pad, d):
            if taps is not None:
                read[taps] = b"\x01" * len(range(size)[taps])
        if not all(read):
            return False
    return True
