"""16-bit gradients where patches match their kernels (|c| → 1), on CPU in a few seconds.

    python -m bench.aligned_patches

Patches are 1×1, 64 channels: each pixel one of four kernels, scaled, plus noise; p = 3. As the
noise shrinks, ``|c|`` → 1 and ``grad_x = G/a·(ŵ − c·s/‖s‖)`` cancels, which amplifies the
rounding of what the backward reads. Prints the relative error ‖got − ref‖ / ‖ref‖ against
float64:

- the reference backend in bfloat16 (``c`` saved in bfloat16, the rest in float32);
- a float64 simulation of the Triton kernels' roundings (``c`` saved and ``grad_d`` stored in
  bfloat16, ``grad_‖s‖/‖s‖`` in float32 from the unrounded ``G``, ŵ in bfloat16), of the same
  with ``c`` in float32 and ``grad_‖s‖/‖s‖`` from the rounded ``grad_d``, and of ``grad_w``
  with the weight-gradient GEMM's float32 ``grad_ŵ`` and with a bfloat16 one.
"""
import torch
from torch.nn.grad import conv2d_input, conv2d_weight

import scd_triton
from scd_triton import reference


def _bf16(t):
    return t.to(torch.bfloat16).double()


def _layer(noise, seed):
    """x [4, 64, 8, 8] of pixels that are kernels of w [4, 64, 1, 1] plus noise; p, q, grad_y."""
    gen = torch.Generator().manual_seed(seed)
    w = _bf16(torch.randn(4, 64, 1, 1, generator=gen, dtype=torch.float64))
    kernel_of = torch.randint(0, 4, (4, 8, 8), generator=gen)
    x = _bf16(w[kernel_of, :, 0, 0].permute(0, 3, 1, 2)
              * (torch.rand(4, 1, 8, 8, generator=gen, dtype=torch.float64) + 0.5)
              + noise * torch.randn(4, 64, 8, 8, generator=gen, dtype=torch.float64))
    p, q = torch.full((4,), 3.0, dtype=torch.float64), torch.full((4,), 0.05, dtype=torch.float64)
    grad_y = _bf16(torch.randn(4, 4, 8, 8, generator=gen, dtype=torch.float64))
    return x, w, p, q, grad_y


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def reference_bf16(x, w, p, q, grad_y):
    """(grad_x, grad_w) errors of the reference backend in bfloat16 against float64."""
    grads = []
    for dtype in (torch.bfloat16, torch.float64):
        xx, ww = x.to(dtype).requires_grad_(), w.to(dtype).requires_grad_()
        pp, qq = (p, q) if dtype == torch.float64 else (p.float(), q.float())
        y = scd_triton.scd2d(xx, ww, pp, qq, backend="reference")
        grads.append(torch.autograd.grad(y, (xx, ww), grad_y.to(dtype)))
    return [_rel(a, b) for a, b in zip(*grads)]


def kernel_roundings(x, w, p, q, grad_y):
    """Errors of simulated kernel roundings: grad_x as shipped, grad_x with float32 c and a
    consistent grad_‖s‖/‖s‖, grad_w with a float32 and with a bfloat16 grad_ŵ."""
    w_hat, scale = reference.normalize_weight(w, q, "norm_q", 1e-12)
    _, c, norm = reference.scd2d_fwd(x, w, p, q, (1, 1), (0,) * 4, (1, 1), 1, 1e-12, 1e-12,
                                     "norm_q", 1e-12)
    a = norm + q.view(1, -1, 1, 1)
    pp = p.view(1, -1, 1, 1)

    def grad_d(cc):
        return grad_y * pp * (cc.abs() + 1e-12) ** (pp - 1) * (cc != 0) / a

    def grad_x(cc, rounded, consistent):
        gd = grad_d(cc)
        gd_used = _bf16(gd) if rounded else gd
        gns = -((gd_used if consistent else gd) * cc).sum(1, keepdim=True) / norm
        return conv2d_input(x.shape, _bf16(w_hat) if rounded else w_hat, gd_used) + x * gns

    def jacobian(g):
        return reference.normalize_weight_backward(g, w, q, "norm_q", 1e-12, scale)[0]

    exact_x = grad_x(c, False, False)
    exact_w = jacobian(conv2d_weight(x, w.shape, grad_d(c)))
    g_rounded = conv2d_weight(x, w.shape, _bf16(grad_d(c)))
    return (_rel(_bf16(grad_x(_bf16(c), True, False)), exact_x),
            _rel(_bf16(grad_x(c, True, True)), exact_x),
            _rel(_bf16(jacobian(g_rounded)), exact_w),
            _rel(_bf16(jacobian(_bf16(g_rounded))), exact_w))


def main():
    print("noise  max|c|  | reference bf16: grad_x  grad_w | kernels simulated: grad_x  "
          "(c float32)  grad_w  (grad_ŵ bf16)")
    for seed in (0, 1):
        for noise in (1.0, 0.3, 0.05, 0.01):
            layer = _layer(noise, seed)
            c = reference.scd2d_fwd(*layer[:4], (1, 1), (0,) * 4, (1, 1), 1, 1e-12, 1e-12,
                                    "norm_q", 1e-12)[1]
            ref_x, ref_w = reference_bf16(*layer)
            sim = kernel_roundings(*layer)
            print(f"{noise:5.2f}  {c.abs().max():.3f}   |  {ref_x:.1e}  {ref_w:.1e}  |  "
                  + "  ".join(f"{e:.1e}" for e in sim))


if __name__ == "__main__":
    main()
