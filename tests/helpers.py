"""Tolerances against the float64 oracle, per dtype, a comparison that names the tensor and
prints the error, the device the Triton tests run on (CUDA where there is one, else the
interpreter on CPU), and a launcher's call with its K unsplit."""
import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")

# relative ‖got − ref‖ / ‖ref‖ bounds: (output, gradients)
REL_TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 5e-5),
           torch.float16: (1e-2, 1e-2), torch.bfloat16: (1e-2, 1e-2)}
# elementwise allclose (rtol, atol), atol before scaling by the reduction length
ELEM_TOL = {torch.float64: (1e-9, 1e-10), torch.float32: (1e-4, 1e-6),
            torch.float16: (2e-2, 1e-3), torch.bfloat16: (5e-2, 1e-2)}


def assert_close(name, got, ref, dtype, grad=False, reduce_dim=1):
    """Relative-norm check plus elementwise allclose with atol scaled by ``reduce_dim``."""
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got, ref = got.double(), ref.double()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    rel = ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    bound = REL_TOL[dtype][1 if grad else 0]
    assert rel <= bound, f"{name}: relative error {rel:.3e} > {bound:.0e}"
    rtol, atol = ELEM_TOL[dtype]
    atol = atol * reduce_dim * max(ref.abs().max().item(), 1.0)
    diff = (got - ref).abs() - (atol + rtol * ref.abs())
    worst = diff.argmax().item() if diff.numel() else 0
    assert diff.numel() == 0 or diff.max() <= 0, (
        f"{name}: elementwise mismatch at flat index {worst}: got {got.flatten()[worst].item():.6e}, "
        f"ref {ref.flatten()[worst].item():.6e} (rel {rel:.2e})")


def unsplit(monkeypatch, launcher, call):
    """``call()`` with the split-K rule of ``launcher`` (``kernels.fwd`` or ``kernels.bwd``)
    giving one split, its launch plans worked out anew before and after."""
    monkeypatch.setattr(launcher, "split_k", lambda *a: 1)
    launcher._plan.cache_clear()
    try:
        return call()
    finally:
        launcher._plan.cache_clear()
