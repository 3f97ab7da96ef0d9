"""kernels/layout.py: the NCHW → channels_last copy equals PyTorch's, bit for bit."""
import pytest
import torch

from helpers import DEVICE
from scd_triton.kernels.layout import to_channels_last

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 70, 9, 9), (3, 64, 8, 8), (2, 130, 1, 67)])
def test_copy_matches_torch(shape, dtype):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    x[0, 0, 0, 0] = float("nan")
    y = to_channels_last(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == x.shape
    torch.testing.assert_close(y, x, rtol=0, atol=0, equal_nan=True)


def test_strided_views_fall_back_to_torch():
    x = torch.randn(2, 8, 6, 10, device=DEVICE)[:, ::2, :, 1:]
    y = to_channels_last(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, x, rtol=0, atol=0)
