"""Independent float64 oracle: SCD written from the formula with ``F.unfold``.

It never imports scd_triton. Gradients come from float64 autograd through it.
"""
import torch
import torch.nn.functional as F


def same_padding(kernel_size, dilation):
    """(top, bottom, left, right) as nn.Conv2d's padding='same' does it."""
    sides = []
    for k, d in zip(kernel_size, dilation):
        total = d * (k - 1)
        sides += [total // 2, total - total // 2]
    return tuple(sides)


def scd2d_normalized(x, w_hat, p, q, stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1),
                     groups=1, eps=1e-12, norm_eps=1e-12):
    """y [N, O, OH, OW] in float64; padding is (top, bottom, left, right); p, q shape () or [O]."""
    x, w_hat = x.double(), w_hat.double()
    N, C, H, W = x.shape
    O, Cg, R, S = w_hat.shape
    G, Og = groups, O // groups
    top, bottom, left, right = padding
    xp = F.pad(x, (left, right, top, bottom))
    cols = F.unfold(xp, (R, S), dilation=dilation, stride=stride)          # [N, C·R·S, L]
    OH = (H + top + bottom - dilation[0] * (R - 1) - 1) // stride[0] + 1
    OW = (W + left + right - dilation[1] * (S - 1) - 1) // stride[1] + 1
    cols = cols.view(N, G, Cg * R * S, OH * OW)
    d = torch.einsum("ngkl,gok->ngol", cols, w_hat.reshape(G, Og, Cg * R * S))
    norm = (cols.square().sum(2) + norm_eps).sqrt()                        # [N, G, L]
    q = q.double().expand(O).reshape(1, G, Og, 1)
    p = p.double().expand(O).reshape(1, G, Og, 1)
    c = d / (norm.unsqueeze(2) + q)
    y = torch.sign(c) * (c.abs() + eps) ** p
    return y.reshape(N, O, OH, OW)


def normalize_kernels(weight, q, norm_eps=1e-12):
    """ŵ = w / (sqrt(Σ w² + norm_eps) + q), per output channel."""
    w = weight.double()
    O = w.shape[0]
    norms = (w.reshape(O, -1).square().sum(1) + norm_eps).sqrt()
    return w / (norms + q.double().expand(O)).view(O, *(1,) * (w.dim() - 1))


def scd2d(x, weight, p, q, eps=1e-12, norm_eps=1e-12, **conv):
    return scd2d_normalized(x, normalize_kernels(weight, q, norm_eps), p, q, eps=eps,
                            norm_eps=norm_eps, **conv)


def rohrer_sharp_cos_sim2d(x, weight, p, log_q, stride=1, padding=0, groups=1, eps=1e-6):
    """The published SharpCosSim2d forward (after its clamps), from its formula."""
    x, w = x.double(), weight.double()
    O = w.shape[0]
    w_hat = w / w.reshape(O, -1).square().sum(1).sqrt().view(O, 1, 1, 1)
    q = torch.exp(log_q.double()).reshape(())
    return scd2d_normalized(x, w_hat, p.double().reshape(O), q, stride=(stride, stride),
                            padding=(padding,) * 4, groups=groups, eps=eps, norm_eps=eps)


def pisoni_keras_nhwc(x_nhwc, kernel, p_raw, q_raw):
    """The Keras CosSimConv2D.call on NHWC input (numpy in, numpy out), from the seed post:
    3×3 stacked shifts, tap-major/channel-minor patches, l2 norms clamped at 1e-12."""
    x = torch.as_tensor(x_nhwc, dtype=torch.float64)
    k = torch.as_tensor(kernel, dtype=torch.float64)
    N, H, W, C = x.shape
    xp = F.pad(x, (0, 0, 1, 1, 1, 1))
    taps = [xp[:, i:i + H, j:j + W, :] for i in range(3) for j in range(3)]
    s = torch.stack(taps, dim=3).reshape(N, H * W, 9 * C)
    q = torch.as_tensor(q_raw, dtype=torch.float64) ** 2 / 10
    l2 = lambda t, axis: torch.sqrt(torch.clamp((t * t).sum(axis, keepdim=True), min=1e-12))
    x_norm = l2(s, 2) + q
    w_norm = l2(k, 1) + q
    sign = torch.sign(s @ k[0])
    out = (s / x_norm) @ (k / w_norm)[0]
    out = out.abs() + 1e-12
    out = out ** torch.softmax(torch.as_tensor(p_raw, dtype=torch.float64), 0)
    return (sign * out).reshape(N, H, W, -1).numpy()
