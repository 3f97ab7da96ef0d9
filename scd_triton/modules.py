"""Layers: ``SCD2d`` / ``SCD1d`` with the published parameterizations, and ``MaxAbsPool``.

A parameterization maps a layer's trainable raw parameters to the kernels, the kernel
normalisation (``ops.WEIGHT_NORMS``, applied inside the core op) and effective ``p``, ``q``, with
plain torch ops that autograd differentiates:

- ``"rohrer"`` (default): ``SharpCosSim2d`` of brohrer/sharpened-cosine-similarity. Parameters
  ``weight [n_kernels, C/groups, *k]`` (U(-w_max, w_max), clamped in place to ±w_max before each
  forward), ``p [1, n_kernels, 1, 1]`` used directly (U(1, 3), clamped in place to ``>= p_min``),
  ``log_q [1, 1, 1, 1]`` with ``q = exp(log_q)`` on the patch norm only; kernel norm
  ``sqrt(Σ w²)`` (an all-zero kernel matches nothing); ``eps = norm_eps`` (1e-6).
  ``shared_weights`` (grouped layers) tiles ``n_kernels = out_channels / groups`` kernels over
  the groups.
- ``"pisoni"``: the Keras ``CosSimConv2D``: ``p = softmax(p_raw)`` over output channels,
  ``q = q_raw² / 10`` on both norms, Glorot-uniform weights as Keras draws them, eps 1e-12.
"""
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .functional import _positive, resolve_padding, scd_nd
from .constants import under_func_transform


def _check_real(options, name, low, strict):
    """A finite real ``options[name]`` > low (strict) or >= low, else ValueError naming it."""
    value = options[name]
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if strict else value >= low))
    if not ok:
        raise ValueError(f"{name} must be a finite float {'>' if strict else '>='} {low}, "
                         f"got {value!r}")


class _RohrerParameterization:
    defaults = dict(shared_weights=False, w_max=1.0, p_min=0.1, q_init=1e-3, eps=1e-6)

    def check(self, o):
        if not isinstance(o["shared_weights"], bool):
            raise ValueError(f"shared_weights must be a bool, got {o['shared_weights']!r}")
        for name in ("w_max", "p_min", "q_init"):  # q_init > 0: log_q = log(q_init)
            _check_real(o, name, 0, strict=True)
        _check_real(o, "eps", 0, strict=False)

    def create(self, layer, factory):
        o = layer.options
        if layer.groups == 1:
            o["shared_weights"] = False
        n_kernels = layer.out_channels // layer.groups if o["shared_weights"] else layer.out_channels
        layer.n_kernels = n_kernels
        ones = (1,) * layer.ndim
        layer.weight = nn.Parameter(torch.empty(n_kernels, layer.in_channels // layer.groups,
                                                *layer.kernel_size, **factory))
        layer.p = nn.Parameter(torch.empty(1, n_kernels, *ones, **factory))
        layer.log_q = nn.Parameter(torch.empty(1, 1, *ones, **factory))

    def reset(self, layer):
        o = layer.options
        nn.init.uniform_(layer.weight, -o["w_max"], o["w_max"])
        nn.init.uniform_(layer.p, 1.0, 3.0)
        nn.init.constant_(layer.log_q, math.log(o["q_init"]))

    def effective(self, layer):
        o = layer.options
        # The published layer clamps the stored parameters in place. Through ``.data`` (same
        # storage, own version counter) so tensors saved by an earlier forward stay valid, and
        # invisible to autograd: the gradient at the clamped value goes to the parameter.
        # torch.export cannot trace that hidden mutation: an exported (inference) program
        # clamps the values it uses instead, which gives the same output. A layer under a
        # torch.func transform, whose parameters are the transform's inputs, clamps the values
        # it uses with the gradient passed straight through, as the in-place clamp gives it.
        weight, p = layer.weight, layer.p
        if torch.compiler.is_exporting():
            weight, p = weight.clamp(-o["w_max"], o["w_max"]), p.clamp(min=o["p_min"])
        elif not torch.compiler.is_compiling() and under_func_transform():
            weight = weight + (weight.clamp(-o["w_max"], o["w_max"]) - weight).detach()
            p = p + (p.clamp(min=o["p_min"]) - p).detach()
        else:
            weight.data.clamp_(-o["w_max"], o["w_max"])
            p.data.clamp_(min=o["p_min"])
        p = p.reshape(-1)
        if o["shared_weights"]:
            weight = weight.repeat(layer.groups, *(1,) * (weight.dim() - 1))
            p = p.repeat(layer.groups)
        q = torch.exp(layer.log_q).reshape(())
        # kernel norm sqrt(Σw²), no eps and no q on it, as published; the op normalises
        return weight, p, q, dict(eps=o["eps"], norm_eps=o["eps"], weight_norm="norm",
                                  weight_norm_eps=0.0)


class _PisoniParameterization:
    defaults = dict(eps=1e-12)

    def check(self, o):
        _check_real(o, "eps", 0, strict=False)

    def create(self, layer, factory):
        layer.weight = nn.Parameter(torch.empty(layer.out_channels, layer.in_channels // layer.groups,
                                                *layer.kernel_size, **factory))
        layer.p_raw = nn.Parameter(torch.empty(layer.out_channels, **factory))
        layer.q_raw = nn.Parameter(torch.empty(1, **factory))

    def reset(self, layer):
        # Keras' glorot_uniform on its (1, taps·C, O) kernel: fan_in = taps·C, fan_out = O.
        fan_in = layer.weight[0].numel()
        limit = math.sqrt(6.0 / (fan_in + layer.out_channels))
        nn.init.uniform_(layer.weight, -limit, limit)
        nn.init.zeros_(layer.p_raw)
        nn.init.zeros_(layer.q_raw)

    def effective(self, layer):
        eps = layer.options["eps"]
        p = torch.softmax(layer.p_raw, dim=0)
        q = (layer.q_raw.square() / 10).reshape(())
        return layer.weight, p, q, dict(eps=eps, norm_eps=eps, weight_norm="norm_q")


PARAMETERIZATIONS = {"rohrer": _RohrerParameterization, "pisoni": _PisoniParameterization}


class _SCDNd(nn.Module):
    ndim = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, parameterization="rohrer", device=None, dtype=None, **options):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {sorted(PARAMETERIZATIONS)}, got "
                             f"{parameterization!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("groups", groups)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must "
                             f"be divisible by groups ({groups})")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        self.param = PARAMETERIZATIONS[parameterization]()
        unknown = set(options) - set(self.param.defaults)
        if unknown:
            raise TypeError(f"unknown options for parameterization {parameterization!r}: "
                            f"{sorted(unknown)}; it takes {sorted(self.param.defaults)}")
        self.in_channels, self.out_channels, self.groups = map(int, (in_channels, out_channels,
                                                                     groups))
        self.kernel_size = _positive(kernel_size, self.ndim, "kernel_size")
        self.stride = _positive(stride, self.ndim, "stride")
        self.dilation = _positive(dilation, self.ndim, "dilation")
        sides = resolve_padding(padding, self.kernel_size, self.stride, self.dilation)  # checks it
        self.padding = padding if isinstance(padding, str) else sides[::2]
        self.parameterization = parameterization
        self.options = {**self.param.defaults, **options}
        self.param.check(self.options)
        self.param.create(self, dict(device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self):
        self.param.reset(self)

    def forward(self, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() == self.ndim + 1:   # one unbatched sample, as nn.Conv2d takes it
            return self(x.unsqueeze(0)).squeeze(0)
        if x.dim() != self.ndim + 2:
            layout = "[N, C, H, W]" if self.ndim == 2 else "[N, C, L]"
            raise ValueError(f"x must be {self.ndim + 2}-D {layout} (or {self.ndim + 1}-D, one "
                             f"unbatched sample), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"x has {x.shape[1]} channels, this layer expects {self.in_channels} "
                             f"(x shape {tuple(x.shape)})")
        weight, p, q, options = self.param.effective(self)
        return scd_nd(x, weight, p, q, self.stride, self.padding, self.dilation, self.groups,
                      backend=None, ndim=self.ndim, **options)

    def extra_repr(self):
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}, padding={self.padding!r}")
        if self.dilation != (1,) * self.ndim:
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        s += f", parameterization={self.parameterization!r}"
        changed = {k: v for k, v in self.options.items() if v != self.param.defaults[k]}
        return s + "".join(f", {k}={v!r}" for k, v in changed.items())


class SCD2d(_SCDNd):
    """Sharpened cosine similarity layer, a drop-in for ``nn.Conv2d`` (input ``[N, C, H, W]``
    or one unbatched ``[C, H, W]``).

    ``parameterization`` is "rohrer" (default) or "pisoni"; ``**options`` are its own
    (rohrer: shared_weights, w_max, p_min, q_init, eps; pisoni: eps).
    """
    ndim = 2


class SCD1d(_SCDNd):
    """1-D :class:`SCD2d`: input ``[N, C, L]``."""
    ndim = 1


class _MaxAbsPoolNd(nn.Module):
    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.ceil_mode = dilation, ceil_mode

    def forward(self, x):
        pool = F.max_pool2d if self.ndim == 2 else F.max_pool1d
        if x.dim() == self.ndim + 1:   # one unbatched sample, as nn.MaxPool2d takes it
            return self(x.unsqueeze(0)).squeeze(0)
        if x.dim() != self.ndim + 2:
            raise ValueError(f"x must be {self.ndim + 2}-D (or {self.ndim + 1}-D, one unbatched "
                             f"sample), got shape {tuple(x.shape)}")
        _, index = pool(x.detach().abs(), self.kernel_size, self.stride, self.padding,
                        self.dilation, self.ceil_mode, return_indices=True)
        if self.ndim == 2 and not x.is_contiguous() and x.is_contiguous(
                memory_format=torch.channels_last):
            # gather along H·W of the NHWC view: no copies, and a channels_last output (like
            # nn.MaxPool2d); max_pool2d gives channels_last indices for channels_last input.
            n, c, oh, ow = index.shape
            y = x.permute(0, 2, 3, 1).flatten(1, 2).gather(
                1, index.permute(0, 2, 3, 1).reshape(n, oh * ow, c))
            return y.view(n, oh, ow, c).permute(0, 3, 1, 2)
        flat = x.flatten(start_dim=2)
        return flat.gather(2, index.flatten(start_dim=2)).view_as(index)

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")


class MaxAbsPool2d(_MaxAbsPoolNd):
    """Per window, the value of largest magnitude with its sign (``nn.MaxPool2d`` arguments)."""
    ndim = 2


class MaxAbsPool1d(_MaxAbsPoolNd):
    """1-D :class:`MaxAbsPool2d`."""
    ndim = 1
