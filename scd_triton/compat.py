"""Converters to and from the published layers' parameter layouts.

Pisoni's Keras ``CosSimConv2D`` keeps a kernel of shape ``(1, 9·C, O)``: tap-major,
channel-minor, taps in row-major order, so ``kernel[0, (3·i + j)·C + c, o] = weight[o, c, i, j]``;
its ``p`` has shape ``(O,)`` and ``q`` shape ``(1,)``. Rohrer's ``SharpCosSim2d`` state_dict
(``weight``, ``p``, ``log_q``) loads as it is into ``SCD2d(..., parameterization="rohrer")``.
"""
import numpy as np
import torch

from .modules import SCD2d

_TAPS = 3  # the Keras layer is 3×3, stride 1, padding "same"


def from_pisoni_keras(kernel, p, q, dtype=torch.float32, device=None) -> SCD2d:
    """An ``SCD2d`` whose output on NCHW input equals the Keras layer's on the same NHWC input."""
    kernel, p, q = (np.asarray(v) for v in (kernel, p, q))
    if kernel.ndim != 3 or kernel.shape[0] != 1 or kernel.shape[1] % (_TAPS * _TAPS):
        raise ValueError(f"kernel must have shape (1, 9*C, O), got {kernel.shape}")
    channels, out_channels = kernel.shape[1] // (_TAPS * _TAPS), kernel.shape[2]
    if p.shape != (out_channels,):
        raise ValueError(f"p must have shape ({out_channels},), got {p.shape}")
    if q.shape != (1,):
        raise ValueError(f"q must have shape (1,), got {q.shape}")
    layer = SCD2d(channels, out_channels, _TAPS, padding="same", parameterization="pisoni",
                  dtype=dtype, device=device)
    weight = kernel[0].reshape(_TAPS, _TAPS, channels, out_channels).transpose(3, 2, 0, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        layer.p_raw.copy_(torch.from_numpy(p))
        layer.q_raw.copy_(torch.from_numpy(q))
    return layer


def to_pisoni_keras(layer: SCD2d):
    """The Keras layer's ``(kernel, p, q)`` numpy arrays for a "pisoni" ``SCD2d`` it can express.

    That is 3×3, stride 1, dilation 1, groups 1 and padding "same" or its equal, the explicit
    padding 1; anything else raises ValueError. Arrays keep the layer's dtype, except bfloat16
    (numpy has none), which becomes float32 exactly.
    """
    if not isinstance(layer, SCD2d) or layer.parameterization != "pisoni":
        raise TypeError("layer must be an SCD2d with parameterization='pisoni'")
    wanted = dict(kernel_size=(_TAPS, _TAPS), stride=(1, 1), dilation=(1, 1), groups=1)
    for name, value in wanted.items():
        if getattr(layer, name) != value:
            raise ValueError(f"the Keras layer has {name}={value}, got {getattr(layer, name)}")
    if layer.padding not in ("same", (1, 1)):
        raise ValueError(f"the Keras layer has padding 'same' (or its equal, 1), got "
                         f"{layer.padding!r}")

    def array(t):   # a copy: editing it must not change the layer
        t = t.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy().copy()

    kernel = array(layer.weight).transpose(2, 3, 1, 0).reshape(1, -1, layer.out_channels)
    return kernel, array(layer.p_raw), array(layer.q_raw)
