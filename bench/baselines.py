"""The formulations people run today, written here from the formulas (not from scd_triton).

``stride`` and ``padding`` are (h, w) pairs. Both compute ``scd2d`` exactly (q on both norms, eps on |c|, norm_eps under the square roots),
so every provider of the benchmark can be checked against the same float64 oracle.
"""
import torch
import torch.nn.functional as F


def _normalize_kernels(w, q, norm_eps):
    O = w.shape[0]
    norms = (w.reshape(O, -1).float().square().sum(1) + norm_eps).sqrt()
    return (w / (norms + q).view(O, *(1,) * (w.dim() - 1))).to(w.dtype)


def unfold_scd2d(x, w, p, q, stride, padding, groups, eps=1e-12, norm_eps=1e-12):
    """Most published SCS code: unfold the patches, normalise them, matmul."""
    N, C, H, W = x.shape
    O, Cg, R, S = w.shape
    G, Og = groups, O // groups
    w_hat = _normalize_kernels(w, q, norm_eps)
    cols = F.unfold(x, (R, S), padding=padding, stride=stride)             # [N, C·R·S, L]
    L = cols.shape[-1]
    OH = (H + 2 * padding[0] - R) // stride[0] + 1
    cols = cols.view(N, G, Cg * R * S, L)
    norm = (cols.float().square().sum(2, keepdim=True) + norm_eps).sqrt()  # [N, G, 1, L]
    d = torch.einsum("ngkl,gok->ngol", cols, w_hat.reshape(G, Og, Cg * R * S)).float()
    c = d / (norm + q.view(1, G, Og, 1))
    y = torch.sign(c) * (c.abs() + eps) ** p.view(1, G, Og, 1)
    return y.reshape(N, O, OH, L // OH).to(x.dtype)


def rohrer_scd2d(x, w, p, q, stride, padding, groups, eps=1e-12, norm_eps=1e-12):
    """The published PyTorch module's formulation: conv2d, a ones-kernel conv2d of x² for the
    patch norms, and elementwise ops that autograd differentiates one by one."""
    O, Cg, R, S = w.shape
    G = groups
    w_hat = _normalize_kernels(w, q, norm_eps)
    d = F.conv2d(x, w_hat, stride=stride, padding=padding, groups=G).float()
    ones = torch.ones(G, Cg, R, S, device=x.device, dtype=x.dtype)
    ssq = F.conv2d(x.square(), ones, stride=stride, padding=padding, groups=G).float()
    norm = torch.repeat_interleave((ssq + norm_eps).sqrt(), O // G, dim=1)
    c = d / (norm + q.view(1, O, 1, 1))
    return (c.sign() * (c.abs() + eps) ** p.view(1, O, 1, 1)).to(x.dtype)
